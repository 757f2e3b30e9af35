"""What every benchmark records: the machine, and a process's own peak memory."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (possibly large) parent."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def machine() -> dict:
    """The machine a result was measured on, and the day (the docs' tables show both)."""
    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def tower_configs(paths: tuple[str, ...]) -> dict[str, str]:
    """Tower name -> its committed config, relative to the checkout (the name as the config resolves it)."""
    import towers
    from config import load_config

    root = Path(__file__).resolve().parents[1]
    return {towers.resolve(load_config(root / path)).model.query_tower: path for path in paths}
