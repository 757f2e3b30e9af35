"""The machine's load during a run, logged into it as MLflow's system metrics."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import psutil
import torch

if TYPE_CHECKING:
    from trainer.tracking.logger import MetricsLogger


class SystemMetrics:
    """CPU, memory (and GPU memory, where there is a GPU) every `every_s` seconds, under the names
    MLflow's System metrics tab shows, sent through the logger so an outage loses none of them."""

    def __init__(self, logger: MetricsLogger, every_s: int):
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
