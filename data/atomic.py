"""Directories and files written atomically: built under a hidden temporary name, then renamed into place, so
a reader sees the old version or the complete new one, never a half-written one. Used by prepare, checkpoints,
export and the torchrun error files."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def replace_directory(tmp: Path, final: Path) -> None:
    """Renames the finished `tmp` to `final`, replacing an existing `final`."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_file(final: Path, text: str) -> None:
    """Writes `text` to `final` through a temporary file in the same folder and a rename."""
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, final)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: Path) -> None:
    """Temp folders left next to `final` by a writer that was killed (kill -9 runs no cleanup): their PID is gone."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for path in final.parent.glob(pattern):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """A fresh temporary directory next to `final`: renamed over `final` if the block succeeds, removed if not."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
