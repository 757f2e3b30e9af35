"""Where a run's params, metrics and artifacts go: one small interface, `MetricsLogger`, with an
MLflow implementation for rank 0 and a null one for the other ranks (and tracking.enabled=false),
so the training loop never asks whether it is tracked.

`MlflowLogger`: every call returns at once, a worker thread does the sending. A failing or
unreachable server during training is warned about and retried a bounded number of times, never
raised into the training loop and never blocking a step. Unreachable at start is a clear error,
because then nothing of the run would be recorded.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Protocol

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from config import TrackingConfig
from serving.runs import default_tracking_uri

log = logging.getLogger(__name__)
ATTEMPTS = 3
MAX_PENDING = 10_000


class TrackingError(RuntimeError):
    pass


def tracking_uri(cfg: TrackingConfig) -> str:
    return default_tracking_uri(cfg.uri)


class MetricsLogger(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, str]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_json(self, data, artifact_file: str) -> None: ...
    def log_image(self, image, artifact_file: str) -> None: ...
    def log_images(self, make) -> None: ...
    def log_artifacts(self, directory: Path, artifact_path: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullLogger:
    """Logs nothing: ranks other than 0, and runs with tracking.enabled=false."""

    run_id = None

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def log_json(self, data, artifact_file: str) -> None:
        pass

    def log_image(self, image, artifact_file: str) -> None:
        pass

    def log_images(self, make) -> None:
        """`make()` returns {artifact file: RGBA array}; not called here, so nothing is drawn for nobody."""

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowLogger:
    def __init__(self, cfg: TrackingConfig, run_id: str | None = None):
        # MLflow's own client retries for minutes by default; we retry ourselves, off the hot path.
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout_s)
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(cfg.experiment)
            if run_id is None:
                run_id = self.client.create_run(experiment_id, run_name=cfg.run_name or None).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as err:  # noqa: BLE001 - any failure here means nothing would be tracked
            raise TrackingError(f"MLflow tracking at {self.uri} is unreachable or refused the run: "
                                f"{str(err).splitlines()[0]}. Start the server, set tracking.uri (or "
                                f"MLFLOW_TRACKING_URI), or set tracking.enabled=false") from err
        self.run_id = run_id
        self.failures = 0
        self.pending: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self.worker = threading.Thread(target=self._work, daemon=True, name="mlflow-logger")
        self.worker.start()

    def _submit(self, description: str, call) -> None:
        try:
            self.pending.put_nowait((description, call))
        except queue.Full:
            self.failures += 1
            log.warning("MLflow logging is %d calls behind; dropping %s", MAX_PENDING, description)

    def _work(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                self.pending.task_done()
                return
            description, call = item
            for attempt in range(ATTEMPTS):
                try:
                    call()
                    break
                except Exception as err:  # noqa: BLE001 - logging must never kill training
                    if attempt == ATTEMPTS - 1:
                        self.failures += 1
                        log.warning("MLflow: giving up on %s after %d attempts: %s", description, ATTEMPTS,
                                    str(err).splitlines()[0])
                    else:
                        time.sleep(2 ** attempt)
            self.pending.task_done()

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for lo in range(0, len(items), 100):
            chunk = items[lo:lo + 100]
            self._submit("params", lambda chunk=chunk: self.client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k.replace("@", "_at_"), float(v), now, step) for k, v in metrics.items()]
        self._submit(f"metrics at step {step}", lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._submit(artifact_file, lambda: self.client.log_text(self.run_id, text, artifact_file))

    def log_json(self, data, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        self._submit(artifact_file, lambda: self.client.log_image(self.run_id, image, artifact_file=artifact_file))

    def log_images(self, make) -> None:
        """`make()` returns {artifact file: RGBA array}: drawn only by a logger that keeps them."""
        for artifact_file, image in make().items():
            self.log_image(image, artifact_file)

    def log_artifacts(self, directory: Path, artifact_path: str) -> None:
        self._submit(artifact_path, lambda: self.client.log_artifacts(self.run_id, str(directory), artifact_path))

    def finish(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Flushes what is queued (bounded by `timeout_s`), then closes the run."""
        self._submit("run status", lambda: self.client.set_terminated(self.run_id, status=status))
        deadline = time.monotonic() + timeout_s
        while not self.pending.empty() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pending.put(None)
        self.worker.join(timeout=max(deadline - time.monotonic(), 0.1))
        if self.worker.is_alive() or self.failures:
            log.warning("MLflow: %d logging calls failed or were dropped for run %s", self.failures, self.run_id)
