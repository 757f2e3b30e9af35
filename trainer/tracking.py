"""Where a run's params, metrics and artifacts go: one small interface, `MetricsLogger`, with an
MLflow implementation for rank 0 and a null one for the other ranks (and tracking.enabled=false),
so the training loop never asks whether it is tracked.

`MlflowLogger` never blocks a step and never loses a record while the job runs:
- every call becomes a record (a JSON-able dict; images are written to PNG files first) in a
  bounded queue, which a worker thread sends in order;
- while the server is unreachable the worker retries the same record with back-off (1 s to 10 s),
  for as long as the job runs; records beyond the queue's bound are appended to the outbox file
  (`<tracking.outbox>/<run id>.jsonl`) instead of being dropped;
- `finish` waits up to `tracking.flush_timeout_s` for the queue, then writes whatever is unsent to
  the outbox file and says so: `python -m trainer.tracking replay FILE` sends it once the server is
  back (metrics keep their original steps and times; the run's final status comes last).
A server unreachable at start is a clear error, because then nothing of the run would be recorded.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import psutil
import torch

from config import TrackingConfig
from serving.runs import default_tracking_uri
from storage import Location

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
MAX_PENDING = 10_000  # records held in memory; more go to the outbox file
# Metrics per log_batch call when a backlog drains: MLflow allows 1,000, but such a call to a busy sqlite-backed
# server took over 2 s (past tracking.request_timeout_s in the outage test); 200 took 0.4 s.
MAX_METRICS_PER_BATCH = 200
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"  # the UI's "model training" mode (not GenAI)
BACKOFF_S = (1, 2, 4, 8, 10)  # then every 10 s for as long as the job runs
PARAMS_PER_CALL = 100


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
    def log_model(self, export_dir: Location, register_as: str) -> None: ...
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

    def log_model(self, export_dir: Location, register_as: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> str | None:
        return None


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

        log_pyfunc(client.tracking_uri, run_id, record["export"], record["register_as"])
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


class MlflowLogger:
    def __init__(self, cfg: TrackingConfig, run_id: str | None = None, run_name: str = "",
                 tags: dict[str, str] | None = None):
        # MLflow's own client retries for minutes by default; we retry ourselves, off the hot path.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        self.uri = tracking_uri(cfg)
        try:
            self.client = client_for(self.uri)
            with store_lock(self.uri):
                experiment_id = experiment_id_for(self.client, cfg.experiment, self.uri)
            if run_id is None:
                run_id = self.client.create_run(experiment_id, run_name=cfg.run_name or run_name or None,
                                                tags=tags or {}).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001 - any failure here means nothing would be tracked
            raise TrackingError(f"MLflow tracking at {self.uri} is unreachable or refused the run: "
                                f"{str(err).splitlines()[0]}. Start the server, set tracking.uri (or "
                                f"MLFLOW_TRACKING_URI), or set tracking.enabled=false") from err
        self.run_id, self.experiment_id = run_id, experiment_id
        self.flush_timeout_s = cfg.flush_timeout_s
        self.outbox = Path(cfg.outbox) / f"{run_id}.jsonl"
        self.files = Path(cfg.outbox) / run_id  # images waiting to be sent
        self.pending: collections.deque = collections.deque()
        self.spilled = 0
        self.lock = threading.Condition()
        self.closing = threading.Event()  # stop the worker; finish takes over what is left
        self.flushing = threading.Event()  # the job is ending: retry at once and every second, not with back-off
        self.worker = threading.Thread(target=self._work, daemon=True, name="mlflow-logger")
        self.worker.start()
        self.system = SystemMetrics(self, cfg.system_metrics_every_s)

    def _submit(self, record: dict) -> None:
        with self.lock:
            if len(self.pending) >= MAX_PENDING:
                self._spill([record])
                return
            self.pending.append(record)
            self.lock.notify()

    def _spill(self, records: list[dict]) -> None:
        """Appends records to the outbox file (created with a header naming the run and the server)."""
        if not records:
            return
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        new = not self.outbox.exists()
        with open(self.outbox, "a") as handle:
            if new:
                handle.write(json.dumps({"run_id": self.run_id, "tracking_uri": self.uri}) + "\n")
            handle.writelines(json.dumps(r) + "\n" for r in records)
        self.spilled += len(records)

    def _work(self) -> None:
        failures = 0
        while True:
            with self.lock:
                while not self.pending and not self.closing.is_set():
                    self.lock.wait()
                if not self.pending or self.closing.is_set():
                    return  # finish takes over what is left
                batch = leading_batch(self.pending)
            try:
                send_batch(self.client, self.run_id, batch)
            except Exception as err:  # noqa: BLE001 - logging must never kill training
                if failures == 0:
                    log.warning("MLflow at %s is failing (%s); buffering and retrying until it is back",
                                self.uri, str(err).splitlines()[0][:200])
                failures += 1
                self._pause(BACKOFF_S[min(failures - 1, len(BACKOFF_S) - 1)])
                if self.closing.is_set():
                    return  # finish takes over what is left
                continue
            if failures:
                log.warning("MLflow at %s is back after %d failed attempts; sending what was buffered", self.uri,
                            failures)
            failures = 0
            with self.lock:
                # Sent records leave the queue; if finish already took the queue over (this send outlived its
                # wait), they are in the outbox too, and a replay sends them again: at least once, never lost.
                for record in batch:
                    if self.pending and self.pending[0] is record:
                        self.pending.popleft()

    def _pause(self, seconds: float) -> None:
        """Back-off: waits `seconds`, but at most 1 s once the job is ending, and returns when closing."""
        start = time.monotonic()
        while not self.closing.wait(0.1):
            elapsed = time.monotonic() - start
            if elapsed >= seconds or (self.flushing.is_set() and elapsed >= 1.0):
                return

    def log_params(self, params: dict[str, str]) -> None:
        items = sorted((k, str(v)[:6000]) for k, v in params.items())
        for lo in range(0, len(items), PARAMS_PER_CALL):
            self._submit({"kind": "params", "params": dict(items[lo:lo + PARAMS_PER_CALL])})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit({"kind": "metrics", "step": step, "timestamp": int(time.time() * 1000),
                      "metrics": {k.replace("@", "_at_"): float(v) for k, v in metrics.items()}})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit({"kind": "text", "text": text, "file": artifact_file})

    def log_images(self, make: Callable[[], dict]) -> None:
        """`make()` returns {artifact file: RGBA array}; each is written as a PNG, then sent."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.image

        for artifact_file, image in make().items():
            path = self.files / artifact_file
            path.parent.mkdir(parents=True, exist_ok=True)
            matplotlib.image.imsave(path, image)
            self._submit({"kind": "file", "path": str(path), "artifact_path": str(Path(artifact_file).parent)})

    def staged(self, directory: Location) -> Path:
        """A local directory MLflow can upload: the export itself, or a copy of a remote one kept with the run's
        other staged files until it has been sent."""
        if directory.is_local:
            return directory.local_path.resolve()
        copy = self.files / "exports" / directory.name
        if not copy.is_dir():
            directory.download(copy)
        return copy.resolve()

    def log_artifacts(self, directory: Location, artifact_path: str) -> None:
        self._submit({"kind": "artifacts", "dir": str(self.staged(directory)), "artifact_path": artifact_path})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        self._submit({"kind": "table", "rows": rows, "file": artifact_file})

    def log_dataset(self, dataset: dict) -> None:
        """`dataset`: name, digest, source, schema (MLflow schema JSON), profile (JSON-able), context."""
        self._submit({"kind": "dataset", **dataset})

    def log_model(self, export_dir: Location, register_as: str) -> None:
        """The export as the run's pyfunc model (serving/pyfunc.py), registered as `register_as` if given."""
        self._submit({"kind": "model", "export": str(self.staged(export_dir)), "register_as": register_as})

    def finish(self, status: str = "FINISHED") -> str | None:
        """Flushes what is queued (waiting at most tracking.flush_timeout_s) and closes the run. Returns
        None when the run's record is complete, else the outbox file holding what could not be sent."""
        self.system.stop()
        self._submit({"kind": "status", "status": status, "timestamp": int(time.time() * 1000)})
        self.flushing.set()
        deadline = time.monotonic() + self.flush_timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.pending:
                    break
            time.sleep(0.05)
        self.closing.set()
        with self.lock:
            self.lock.notify_all()
        self.worker.join(timeout=self.request_budget())
        with self.lock:
            left = list(self.pending)
            self.pending.clear()
        if left:
            self._spill(left)
        elif self.spilled:
            replay(self.outbox, self.client)  # spilled during a long outage; the server is back now
        if not self.outbox.exists():
            remove_staged(self.files)
            return None
        log.warning("MLflow: %d records of run %s could not be sent to %s; they are in %s. Once the server is "
                    "back: python -m trainer.tracking replay %s", count_records(self.outbox), self.run_id, self.uri,
                    self.outbox, self.outbox)
        return str(self.outbox)

    def request_budget(self) -> float:
        return float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 10)) + 1.0


class SystemMetrics:
    """CPU, memory (and GPU memory, where there is a GPU) every `every_s` seconds, under the names
    MLflow's System metrics tab shows, sent through the logger so an outage loses none of them."""

    def __init__(self, logger: MlflowLogger, every_s: int):
        self.logger, self.every_s, self.stopped = logger, every_s, threading.Event()
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._run, daemon=True, name="system-metrics")
        if every_s > 0:
            self.thread.start()

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        values = {"system/cpu_utilization_percentage": psutil.cpu_percent(),
                  "system/system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
                  "system/system_memory_usage_percentage": memory.percent,
                  "system/process_rss_megabytes": psutil.Process().memory_info().rss / 2**20}
        for gpu in range(torch.cuda.device_count()):
            values[f"system/gpu_{gpu}_memory_usage_megabytes"] = torch.cuda.memory_allocated(gpu) / 2**20
        return values

    def _run(self) -> None:
        psutil.cpu_percent()  # the first reading is meaningless
        while not self.stopped.wait(self.every_s):
            self.logger.log_metrics(self.sample(), int(time.monotonic() - self.start))
        # One last reading at the end: a run always has its final CPU and memory, however its sampling was timed.
        self.logger.log_metrics(self.sample(), int(time.monotonic() - self.start))

    def stop(self) -> None:
        """Ends the sampling after its last reading, which is queued before the run's status."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)


def count_records(path: Path) -> int:
    with open(path) as handle:
        return max(sum(1 for _ in handle) - 1, 0)


def replay(path: Path, client: MlflowClient | None = None) -> list[dict]:
    """Sends an outbox file's records in order; keeps the ones not sent (file rewritten), or removes the
    file and the run's staged images when all went through. Returns what is left."""
    path = Path(path)
    with open(path) as handle:
        header, *records = [json.loads(line) for line in handle if line.strip()]
    client = client or client_for(header["tracking_uri"])
    sent = 0
    while sent < len(records):
        batch = leading_batch(records, sent)
        try:
            send_batch(client, header["run_id"], batch)
        except Exception as err:  # noqa: BLE001 - reported, and kept for the next replay
            log.warning("replay stopped at record %d of %d: %s", sent + 1, len(records), str(err).splitlines()[0])
            left = records[sent:]
            path.write_text("".join(json.dumps(r) + "\n" for r in [header, *left]))
            return left
        sent += len(batch)
    path.unlink()
    remove_staged(path.with_suffix(""))
    return []


def remove_staged(files: Path) -> None:
    """Removes a run's staged images, and the outbox folder itself once nothing is left in it."""
    shutil.rmtree(files, ignore_errors=True)
    try:
        files.parent.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking",
                                     description="Sends what a job could not send to MLflow (its outbox file).")
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("replay", help="replay an outbox file into its run")
    command.add_argument("file")
    command.add_argument("--tracking-uri", help="send to this server instead of the one recorded in the file")
    args = parser.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"error: {path}: no such outbox file", file=sys.stderr)
        return 2
    total = count_records(path)
    left = replay(path, client_for(args.tracking_uri) if args.tracking_uri else None)
    if left:
        print(f"error: sent {total - len(left)} of {total} records; {len(left)} are still in {path} (run this again "
              f"once the server answers)", file=sys.stderr)
        return 1
    print(f"sent {total} records; {path} removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
