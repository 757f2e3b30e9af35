"""The one interface the training loop logs through, `MetricsLogger`, and `NullLogger` for the ranks (and
runs) that do not track: the loop never asks whether it is tracked."""

from __future__ import annotations

from typing import Callable, Protocol

from config import TrackingConfig
from serving.runs import default_tracking_uri
from storage import Location


class TrackingError(RuntimeError):
    pass


def tracking_uri(cfg: TrackingConfig) -> str:
    return default_tracking_uri(cfg.uri)


class MetricsLogger(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_images(self, make: Callable[[], dict]) -> None: ...
    def log_artifacts(self, directory: Location, artifact_path: str) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_table(self, rows: list[dict], artifact_file: str) -> None: ...
    def log_dataset(self, dataset: dict) -> None: ...
    def log_model(self, export_dir: Location, register_as: str, metrics: dict[str, float], step: int) -> None: ...
    def finish(self, status: str = "FINISHED") -> str | None: ...


class NullLogger:
    """Logs nothing: ranks other than 0, and runs with tracking.enabled=false."""

    run_id = None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_images(self, make: Callable[[], dict]) -> None:
        """`make()` returns {artifact file: RGBA array}; not called here, so nothing is drawn for nobody."""

    def log_artifacts(self, directory: Location, artifact_path: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        pass

    def log_dataset(self, dataset: dict) -> None:
        pass

    def log_model(self, export_dir: Location, register_as: str, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> str | None:
        return None
