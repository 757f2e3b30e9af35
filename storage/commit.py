"""The commit protocol for everything written as a directory: prepared datasets, checkpoints, exports.

Object stores have no atomic rename, so completeness is a file: `_manifest.json`, written last, lists every
file of the directory with its size and SHA-256. A reader uses a directory only when its manifest is there
and every file it lists has the recorded size (`require_committed`, one listing); `verify` also checks the
SHA-256 of every file. A writer that fails or is killed leaves no manifest, so nothing it wrote looks
complete.

Where the files go while they are written (`begin`): on a local disk, a hidden sibling directory
`.<name>.tmp-<pid>` renamed over the target once committed, so the previous version stays readable until the
new one is complete, and the temporaries of a killed writer are removed by the next one; on an object store,
the target prefix itself, whose old manifest is deleted first (the old version stops being complete before
any of its files change) along with every file under it.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import pyarrow as pa

from storage.filesystems import StorageError
from storage.location import Location, location

MANIFEST_FILE = "_manifest.json"
MANIFEST_FORMAT = 1


class CommitError(StorageError):
    """A directory that is not a complete, committed write, or whose files do not match their manifest. `problem`
    is the finding alone ("nothing there", "no _manifest.json ...", "x.parquet is missing"), for callers that
    phrase their own expectation."""

    def __init__(self, uri: str, kind: str, problem: str, hint: str):
        super().__init__(uri, problem)
        self.kind, self.hint = kind, hint

    def __str__(self) -> str:
        return f"{self.uri}: not a complete {self.kind}: {self.problem} ({self.hint})"


@dataclass
class Manifest:
    kind: str  # what was written: "prepared dataset", "checkpoint", "export"
    files: dict[str, dict] = field(default_factory=dict)  # name -> {"size": bytes, "sha256": hex}
    created: float = 0.0
    format: int = MANIFEST_FORMAT

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise ValueError("not a manifest object with a 'files' mapping")
        return cls(kind=str(data.get("kind", "")), files=data["files"], created=float(data.get("created", 0.0)),
                   format=int(data.get("format", MANIFEST_FORMAT)))


def read_manifest(directory: Location) -> Manifest | None:
    """The directory's manifest; None when it has none (never committed, or a write in progress)."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    text = path.read_text()
    try:
        return Manifest.from_json(text)
    except (ValueError, TypeError, KeyError) as err:
        raise CommitError(str(path), "directory", f"an unreadable manifest ({err})", "write it again") from None


def committed(directory: Location) -> bool:
    return (directory / MANIFEST_FILE).is_file()


def size_problem(directory: Location, manifest: Manifest) -> str | None:
    """The first file the manifest lists that is missing or has another size (one listing of the directory)."""
    present = directory.files()
    for name, entry in sorted(manifest.files.items()):
        if name not in present:
            return f"{name} is missing"
        if present[name] != entry["size"]:
            return f"{name} has {present[name]} bytes, but {entry['size']} were committed"
    return None


def require_committed(where: "Location | str", kind: str, hint: str) -> Manifest:
    """The manifest of a complete `kind` at `where`; a CommitError naming what is missing otherwise."""
    directory = location(where)
    manifest = read_manifest(directory)
    if manifest is None:
        if not directory.exists():
            raise CommitError(directory.uri, kind, "nothing there", hint)
        raise CommitError(directory.uri, kind, f"no {MANIFEST_FILE}, which a write adds last (the write failed, was "
                                               f"killed or is still running)", hint)
    problem = size_problem(directory, manifest)
    if problem:
        raise CommitError(directory.uri, kind, problem, hint)
    return manifest


def verify(directory: Location, manifest: Manifest | None = None) -> str | None:
    """Why the directory's files cannot be trusted, or None when each has its recorded size and SHA-256."""
    try:
        manifest = manifest or read_manifest(directory)
    except StorageError as err:
        return err.problem
    if manifest is None:
        return f"no {MANIFEST_FILE}"
    problem = size_problem(directory, manifest)
    if problem:
        return problem
    for name, entry in sorted(manifest.files.items()):
        if (directory / name).sha256()[1] != entry["sha256"]:
            return f"{name} does not match its SHA-256 (overwritten or corrupted)"
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(final: Location) -> None:
    """Local temporaries left next to `final` by a writer that was killed (kill -9 runs no cleanup)."""
    for entry in final.parent.children():
        if entry.name.startswith(f".{final.name}.tmp-") or entry.name.startswith(f".{final.name}.old-"):
            pid = entry.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                entry.remove()


class Staging:
    """Where a directory is written before it is committed, and the record of what was written."""

    def __init__(self, final: Location, kind: str, where: Location):
        self.final, self.kind, self.location = final, kind, where
        self.entries: dict[str, dict] = {}

    def __truediv__(self, name: str) -> Location:
        return self.location / name

    def record(self, name: str, size: int, sha256: str) -> None:
        """A file written into the staging location (by this process or another one, such as a Spark task)."""
        self.entries[name] = {"size": int(size), "sha256": sha256}

    def write_bytes(self, name: str, data: bytes) -> None:
        self.record(name, *(self.location / name).write_bytes(data))

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_parquet(self, name: str, table: pa.Table, row_group_size: int | None = None) -> None:
        self.record(name, *(self.location / name).write_parquet(table, row_group_size))

    def record_written(self) -> None:
        """Hashes every file under the staging location not recorded yet (files a library wrote itself)."""
        for name in sorted(self.location.files()):
            if name not in self.entries and name != MANIFEST_FILE:
                self.record(name, *(self.location / name).sha256())


def begin(final: "Location | str", kind: str) -> Staging:
    """Prepares a write of `final` (see the module's docstring)."""
    final = location(final)
    if final.is_local:
        final.parent.makedirs()
        remove_stale_temporaries(final)
        where = final.sibling(f".{final.name}.tmp-{os.getpid()}")
        where.remove()
        where.makedirs()
    else:
        (final / MANIFEST_FILE).remove()
        final.remove()
        where = final
    return Staging(final, kind, where)


def commit(staging: Staging) -> Manifest:
    """Writes the manifest, last; on a local disk then renames the staging directory over the target."""
    manifest = Manifest(staging.kind, dict(sorted(staging.entries.items())), time.time())
    (staging.location / MANIFEST_FILE).write_text(json.dumps(asdict(manifest), indent=1) + "\n")
    if staging.location != staging.final:
        final = staging.final
        old = final.sibling(f".{final.name}.old-{os.getpid()}")
        old.remove()
        if final.exists():
            final.move_to(old)
        staging.location.move_to(final)
        old.remove()
    return manifest


def abort(staging: Staging) -> None:
    """Removes what a failed write left (best effort: the missing manifest already marks it incomplete)."""
    try:
        if staging.location != staging.final:
            staging.location.remove()
        else:
            (staging.final / MANIFEST_FILE).remove()
            staging.final.remove()
    except StorageError:
        pass


@contextmanager
def writing(final: "Location | str", kind: str) -> Iterator[Staging]:
    """`with writing(uri, "export") as out: out.write_parquet(...)`: committed if the block succeeds, removed if
    not."""
    staging = begin(final, kind)
    try:
        yield staging
        commit(staging)
    except BaseException:
        abort(staging)
        raise
