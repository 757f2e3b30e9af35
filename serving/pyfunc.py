"""The export as an MLflow pyfunc model: what `mlflow models serve`, `mlflow.pyfunc.load_model` and the
Model Registry take. It wraps `serving.recommend.Recommender`, so it answers exactly as the recommend
CLI does, and it loads without TorchRec or FBGEMM (the model carries `serving/` and `data/` as code).

Input: one row per query, `history` (raw item ids, oldest first) and optionally `user` (a raw user
id), any user or context feature by name (`value`, or `a|b` for a list feature), and for a model that reads event
times `times` (unix seconds, one per history id) and `at` (the query's, default now); the parameter `k` (default
10). Output: per row, `items` (raw ids, best first) and `scores`.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array

log = logging.getLogger(__name__)
MODEL_ARTIFACT = "model"  # the pyfunc model's name in the run (runs:/<run id>/model)
EXPORT_ARTIFACT_KEY = "export"
DEFAULT_K = 10
ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ("torch", "numpy", "pandas", "pyarrow", "faiss-cpu", "mlflow")


def pinned_requirements() -> list[str]:
    """The serving packages at the versions this process runs (the ones the model was trained and exported with),
    so `mlflow models serve` builds the same environment rather than whatever is newest. A local build's label
    (torch's `+cpu`) is not on PyPI: it is left out."""
    return [f"{name}=={version(name).split('+')[0]}" for name in REQUIREMENTS]


def absent(value) -> bool:
    """A missing cell: None, or the NaN pandas puts where a row has no list."""
    return value is None or (isinstance(value, float) and value != value)


class Recommendations(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from serving.model import ExportedModel
        from serving.recommend import Recommender

        self.recommender = Recommender(ExportedModel(context.artifacts[EXPORT_ARTIFACT_KEY]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", DEFAULT_K))
        features = self.recommender.model.features
        rows = []
        for row in model_input.to_dict("records"):
            given = {name: str(row[name]).split("|") for name in features
                     if name in row and row[name] is not None and not pd.isna(row[name])}
            user, times, at = row.get("user"), row.get("times"), row.get("at")
            ranked = self.recommender.recommend([str(i) for i in row["history"]], given,
                                                None if user is None or pd.isna(user) else str(user), k,
                                                times=None if absent(times) else [int(t) for t in times],
                                                at=None if at is None or pd.isna(at) else int(at))
            rows.append({"items": [r.raw_id for r in ranked], "scores": [r.score for r in ranked]})
        return pd.DataFrame(rows, columns=["items", "scores"])


def signature(features: list[str]) -> ModelSignature:
    inputs = [ColSpec(Array(DataType.string), "history"), ColSpec(DataType.string, "user", required=False),
              ColSpec(Array(DataType.long), "times", required=False), ColSpec(DataType.long, "at", required=False)]
    inputs += [ColSpec(DataType.string, name, required=False) for name in features]
    return ModelSignature(inputs=Schema(inputs),
                          outputs=Schema([ColSpec(Array(DataType.string), "items"),
                                          ColSpec(Array(DataType.double), "scores")]),
                          params=ParamSchema([ParamSpec("k", DataType.long, DEFAULT_K)]))


def log_pyfunc(tracking_uri: str, run_id: str, export_dir: str, register_as: str = "",
               metrics: dict[str, float] | None = None, step: int = 0) -> None:
    """Logs `export_dir` as the run's pyfunc model (and registers it as `register_as`, when given), with the
    evaluation `metrics` linked to the logged model (MLflow's model page lists them)."""
    from serving.model import ExportedModel

    model = ExportedModel(export_dir)
    example = pd.DataFrame({"history": [model.raw_ids[:3]]})
    if model.reads_times:
        example["times"], example["at"] = [[1_700_000_000, 1_700_003_600, 1_700_007_200]], 1_700_010_800
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, python_model=Recommendations(),
                                artifacts={EXPORT_ARTIFACT_KEY: str(export_dir)},
                                signature=signature(list(model.features)), input_example=example,
                                code_paths=[str(ROOT / "serving"), str(ROOT / "data")],
                                pip_requirements=pinned_requirements(),
                                registered_model_name=register_as or None)
        if metrics:
            try:  # the model is logged (and registered): a failure here must not have the record sent again
                mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
            except Exception as err:  # noqa: BLE001 - the same metrics are on the run; the link is a convenience
                log.warning("the test metrics could not be linked to the logged model %s: %s", info.model_id,
                            str(err).splitlines()[0])
