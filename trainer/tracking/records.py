"""A record (a JSON-able dict the logger queues) sent to MLflow: one call per record, or several metrics records
in one log_batch when a backlog drains; and the client for a tracking URI, with the experiment it logs to."""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

# Metrics per log_batch call when a backlog drains: MLflow allows 1,000, but such a call to a busy sqlite-backed
# server took over 2 s (past tracking.request_timeout_s in the outage test); 200 took 0.4 s.
MAX_METRICS_PER_BATCH = 200
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "model training" mode (not GenAI)


@contextlib.contextmanager
def store_lock(uri: str):
    """Holds `<db>.lock` while a process first talks to a sqlite store. MLflow creates and migrates a new store
    on first contact, and two jobs started at once on a fresh file fail half-way ("duplicate column name: step",
    or an alembic "0 found"); both would also create the experiment. A server serialises this itself."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri[len("sqlite:///"):])
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def client_for(uri: str) -> MlflowClient:
    """MLflow is imported here, when a rank first talks to it, not with this module: it is about a third of
    a trainer process's start-up, and the ranks that do not track (all but rank 0) never need it."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):  # the client creates (and migrates) a new sqlite store as it starts
        return MlflowClient(tracking_uri=uri)


def metric_entities(record: dict) -> list[Metric]:
    from mlflow.entities import Metric

    return [Metric(k, v, record["timestamp"], record["step"]) for k, v in record["metrics"].items()]


def leading_batch(records: collections.deque | list, start: int = 0) -> list[dict]:
    """The records to send in one call: records[start], and when it holds metrics, the metrics records right
    behind it while they fit in one MLflow log_batch (a backlog after an outage drains in few requests)."""
    batch = [records[start]]
    if batch[0]["kind"] != "metrics":
        return batch
    count = len(batch[0]["metrics"])
    for record in itertools.islice(records, start + 1, None):
        if record["kind"] != "metrics" or count + len(record["metrics"]) > MAX_METRICS_PER_BATCH:
            break
        batch.append(record)
        count += len(record["metrics"])
    return batch


def send_batch(client: MlflowClient, run_id: str, records: list[dict]) -> None:
    """Sends `leading_batch` records: several metrics records as one call, anything else one by one."""
    if len(records) > 1:
        client.log_batch(run_id, metrics=[m for record in records for m in metric_entities(record)])
    else:
        send(client, run_id, records[0])


def send(client: MlflowClient, run_id: str, record: dict) -> None:
    """Sends one record; raises on any failure (the caller retries or keeps it)."""
    from mlflow.entities import Dataset as DatasetEntity
    from mlflow.entities import DatasetInput, InputTag, Param, RunTag

    kind = record["kind"]
    if kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
    elif kind == "metrics":
        client.log_batch(run_id, metrics=metric_entities(record))
    elif kind == "text":
        client.log_text(run_id, record["text"], record["file"])
    elif kind == "file":
        client.log_artifact(run_id, record["path"], record["artifact_path"] or None)
    elif kind == "artifacts":
        client.log_artifacts(run_id, record["dir"], record["artifact_path"])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif kind == "table":
        import pandas as pd

        client.log_table(run_id, data=pd.DataFrame(record["rows"]), artifact_file=record["file"])
    elif kind == "dataset":
        dataset = DatasetEntity(name=record["name"], digest=record["digest"], source_type="local",
                                source=json.dumps({"uri": record["source"]}), schema=record["schema"],
                                profile=json.dumps(record["profile"]))
        context = InputTag("mlflow.data.context", record["context"])
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, [context])])
    elif kind == "model":
        from serving.pyfunc import log_pyfunc

        log_pyfunc(client.tracking_uri, run_id, record["export"], record["register_as"], record.get("metrics"),
                   record.get("step", 0))
    elif kind == "status":
        client.set_terminated(run_id, status=record["status"], end_time=record["timestamp"])
    else:
        raise ValueError(f"unknown tracking record kind '{kind}'")


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a run tracked in a local sqlite file go next to that file, not into the working
    directory's ./mlruns (MLflow's default), so a job leaves nothing where it was started."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / experiment)


def experiment_id_for(client: MlflowClient, name: str, uri: str) -> str:
    """The experiment's id, created (tagged as model training) when missing. Two jobs creating it at once through
    a server: the second's create fails, and it takes the first one's."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri, name),
                                            tags={EXPERIMENT_KIND: TRAINING_KIND})
        except Exception:  # noqa: BLE001 - re-read below; raised again if it is still missing
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND) != TRAINING_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
    return experiment.experiment_id
