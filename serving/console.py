"""What a command prints: the known noise of the libraries under it (deprecations aimed at TorchRec's own
developers, planner advice, MLflow's start-up chatter and progress bars) filtered at the entry points, each by its
category or logger and its text, never all warnings; `--verbose` keeps everything. Under torchrun the ranks
other than 0 drop library warnings altogether, so a job prints one copy, not one per rank.

It lives in the serving layer, the lowest one every entry point with such noise imports (trainer, export,
recommend).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Python warnings: (category, message pattern, module pattern).
WARNINGS = (
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", r"torch\.distributed"),
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues", r"torchrec\.distributed\.planner"),
    (FutureWarning, r"`broadcast_buffers` is deprecated", r"torchrec\.distributed"),
)
# Log records: logger name -> message patterns.
RECORDS = {
    "torchrec.distributed.planner.types": (r"The topology was constructed directly",),
    "torchrec.distributed.planner.storage_reservations": (r"There is a known issue with TorchRec's dense tensor",),
    "torch.fx._symbolic_trace": (r"is_fx_tracing will return true",),
    "mlflow.store.db.utils": (r"Creating initial MLflow database tables", r"Updating database tables"),
    "mlflow.pyfunc": (r"Passing a Python object as `python_model` causes it to be serialized",
                      r"Validating input example against model signature"),
    "alembic.runtime.migration": (r"Context impl SQLiteImpl", r"Will assume non-transactional DDL", r"Running upgrade"),
}
ENVIRONMENT = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # a bar per artifact download or upload
LIBRARIES = r"(torch|torchrec|fbgemm_gpu|mlflow|torchx)(\.|$)"


class DropKnown(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet(verbose: bool = False, rank: int | None = None) -> None:
    """Filters the known noise (nothing when `verbose`). Idempotent."""
    if verbose:
        return
    for key, value in ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropKnown) for f in logger.filters):
            logger.addFilter(DropKnown(patterns))
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    if rank != 0:
        warnings.filterwarnings("ignore", module=LIBRARIES)
