"""train.precision: which dtype the training step's dense arithmetic runs in.

`bf16` runs the towers' dense layers under bfloat16 autocast and the loss kernel's three matrix products per
chunk in bfloat16; parameters, optimizer state, embedding tables, the loss's exponentials and sums, and every
gradient accumulator stay float32. Evaluation, the popularity baseline and the export always run in float32,
so the metrics are float32 numbers of a model trained in mixed precision.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions


def matmul_dtype(precision: str) -> torch.dtype | None:
    """The loss kernel's product dtype for `precision` (None: the inputs' own, float32)."""
    return DTYPES[precision]


def autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """The towers' forward context: bfloat16 autocast on the device type ("cpu", "cuda") for `bf16`, nothing for
    `fp32`."""
    dtype = DTYPES[precision]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU has bf16 matrix instructions; None where /proc/cpuinfo cannot tell (not Linux)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return None
    return any(f" {flag}" in flags for flag in CPU_BF16_FLAGS)


def warn_if_slow(precision: str, device: torch.device) -> None:
    """bf16 on a CPU without bf16 instructions is emulated and slower than fp32: say so once, before training."""
    if precision == "bf16" and device.type == "cpu" and cpu_has_bf16() is False:
        log.warning("train.precision=bf16 on a CPU without %s: bfloat16 products are emulated there and slower "
                    "than float32; set train.precision=fp32", " or ".join(CPU_BF16_FLAGS))
