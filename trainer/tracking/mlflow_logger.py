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
A server unreachable at start is a clear error, because then nothing of the run would be recorded."""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from config import TrackingConfig
from storage import Location
from trainer.tracking.logger import TrackingError, tracking_uri
from trainer.tracking.outbox import count_records, remove_staged, replay
from trainer.tracking.records import client_for, experiment_id_for, leading_batch, send_batch, store_lock
from trainer.tracking.system_metrics import SystemMetrics

log = logging.getLogger(__name__)
MAX_PENDING = 10_000  # records held in memory; more go to the outbox file
BACKOFF_S = (1, 2, 4, 8, 10)  # then every 10 s for as long as the job runs
PARAMS_PER_CALL = 100


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

    def log_model(self, export_dir: Location, register_as: str, metrics: dict[str, float], step: int) -> None:
        """The export as the run's pyfunc model (serving/pyfunc.py), registered as `register_as` if given, with
        `metrics` linked to it."""
        self._submit({"kind": "model", "export": str(self.staged(export_dir)), "register_as": register_as,
                      "metrics": {k.replace("@", "_at_"): float(v) for k, v in metrics.items()}, "step": step})

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
