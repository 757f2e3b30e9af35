"""`python -m launch.run ARGS` is `torchrun ARGS`, plus one thing: when a worker dies without writing
an error file (SIGKILL, the kernel's OOM killer), torchrun's agent records nothing, and torchx then
reports the *consequence* on another node (a gloo "connection reset") as the job's error. Here the
agent writes the root cause (rank, exit code, signal) to its own error file, timestamped when the
worker died, so torchx, which reports the earliest error file, names the first failure."""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from trainer.distributed import write_error_file


def record_root_cause(err: ChildFailedError) -> None:
    rank, failure = err.get_first_failure()
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(failure.error_file or ""):
        return  # torchrun copies a worker's own error file itself
    cause = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    message = (f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) of {err.name} died with {cause} "
               f"and wrote no error file: it was killed (for example by the OOM killer or a SIGKILL)")
    write_error_file(path, message, failure.timestamp)


def main() -> None:
    try:
        torchrun()
    except ChildFailedError as err:
        record_root_cause(err)
        sys.exit(1)


if __name__ == "__main__":
    main()
