"""What every benchmark records: the machine, and a process's own peak memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (possibly large) parent."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
