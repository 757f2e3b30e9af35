"""Where an export is found: a directory, or the `export/` artifacts of an MLflow run.

The tracking URI default is defined here, the layer below the trainer, so that training logs to the
same place that serving reads from.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from serving.format import MANIFEST_FILE
from storage import Location, location

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPORT_ARTIFACT = "export"  # where training logs the export in the MLflow run
LOCAL_EXPORTS = "exports"  # export.dir's default (config/job.py; tests/serving/test_export.py holds them equal)


def default_tracking_uri(configured: str = "") -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def resolve(run: str, tracking_uri: str | None = None) -> Location:
    """An export directory as given (a local path or a URI), or for an MLflow run id the run's export: the local
    copy the trainer wrote under `exports/<run id>` (export.dir's default) when it is there, else the run's
    `export/` artifacts, downloaded."""
    path = location(run)
    if (path / MANIFEST_FILE).is_file():
        return path
    if (path / EXPORT_ARTIFACT / MANIFEST_FILE).is_file():
        return path / EXPORT_ARTIFACT
    if path.exists():
        raise FileNotFoundError(f"{path}: no {MANIFEST_FILE} here or in {path / EXPORT_ARTIFACT}")
    if path.scheme:
        raise FileNotFoundError(f"{path}: no such export (nothing at that URI)")
    uri = default_tracking_uri(tracking_uri or "")
    if not re.fullmatch(r"[0-9a-f]{32}", run):
        raise FileNotFoundError(f"'{run}' is neither an export directory (no such directory) nor an MLflow run id")
    local = location(LOCAL_EXPORTS) / run
    if (local / MANIFEST_FILE).is_file():
        return local
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise FileNotFoundError(f"no MLflow store at {uri} to find run {run} in: pass --tracking-uri")
    import mlflow

    try:
        return location(mlflow.artifacts.download_artifacts(run_id=run, artifact_path=EXPORT_ARTIFACT,
                                                            tracking_uri=uri))
    except Exception as err:  # noqa: BLE001 - any MLflow failure means the same thing to the user
        raise FileNotFoundError(f"'{run}' is neither an export directory nor an MLflow run with an "
                                f"'{EXPORT_ARTIFACT}' artifact in {uri}: {str(err).splitlines()[0]}") from err
