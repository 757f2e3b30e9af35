"""A URI as a pyarrow filesystem and a path (`Location`), with the reads and writes the project needs; the
filesystem behind each scheme, and the errors in the user's terms, are storage/filesystems.py's."""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from storage.filesystems import MissingError, StorageError, failure, resolve

CHUNK = 1 << 22  # bytes per read when hashing or copying


@dataclass(frozen=True)
class Location:
    """A file or directory on some filesystem. `str()` is the URI as the user wrote it, for messages."""

    uri: str
    fs: pafs.FileSystem = field(compare=False, repr=False)
    path: str
    scheme: str = ""

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "Location":
        name = str(name).strip("/")
        if not name:
            return self
        return Location(f"{self.uri.rstrip('/')}/{name}", self.fs, f"{self.path.rstrip('/')}/{name}", self.scheme)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        uri = self.uri.rstrip("/")
        parent_uri = uri.rsplit("/", 1)[0] if "/" in uri.split("://", 1)[-1] else ("." if not self.scheme else uri)
        return Location(parent_uri, self.fs, self.path.rstrip("/").rsplit("/", 1)[0] or "/", self.scheme)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The path on this machine, for libraries that only take one (local locations only)."""
        if not self.is_local:
            raise StorageError(self.uri, "expected a local path here")
        return Path(self.path)

    def sibling(self, name: str) -> "Location":
        return self.parent / name

    @contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Every filesystem error inside the block becomes one StorageError line naming this URI."""
        try:
            yield
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as err:
            error = failure(err, self.uri, self.scheme, action)
            if isinstance(error, MissingError) and self.scheme == "s3" and not self.bucket_exists():
                error = MissingError(self.uri, f"the bucket '{self.path.split('/', 1)[0]}' does not exist")
            raise error from None

    def bucket_exists(self) -> bool:
        try:
            return self.fs.get_file_info(self.path.split("/", 1)[0]).type != pafs.FileType.NotFound
        except (OSError, pa.ArrowException):
            return True  # unknown: keep the original error

    def info(self) -> pafs.FileInfo:
        with self.errors("read its status"):
            return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise MissingError(self.uri, "no such file" if info.type == pafs.FileType.NotFound else "not a file")
        return int(info.size)

    def files(self) -> dict[str, int]:
        """Every file under this directory (recursively): relative name -> size; empty when there is none."""
        with self.errors("list it"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        prefix = self.path.rstrip("/") + "/"
        return {i.path[len(prefix):]: int(i.size) for i in infos
                if i.type == pafs.FileType.File and i.path.startswith(prefix)}

    def children(self) -> list["Location"]:
        """The entries directly under this directory (none when it does not exist)."""
        with self.errors("list it"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False, allow_not_found=True))
        return sorted((self / i.base_name for i in infos), key=lambda loc: loc.name)

    def read_bytes(self) -> bytes:
        with self.errors("read it"):
            with self.fs.open_input_stream(self.path, compression=None) as stream:
                return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        data = self.read_bytes()
        try:
            return data.decode(encoding)
        except UnicodeDecodeError as err:
            raise StorageError(self.uri, f"not {encoding} text: {err}") from None

    def open_input(self) -> pa.NativeFile:
        """Random access (Parquet footers and row groups)."""
        with self.errors("open it"):
            return self.fs.open_input_file(self.path)

    def open_input_stream(self, compression: str | None = "detect") -> pa.NativeFile:
        """Sequential reading, decompressed by the file's extension (`.gz`, `.bz2`, `.zst`) by default."""
        with self.errors("open it"):
            return self.fs.open_input_stream(self.path, compression=compression)

    def makedirs(self) -> None:
        """Creates the directory on filesystems that have directories (object stores need none)."""
        if self.is_local:
            with self.errors("create the directory"):
                self.fs.create_dir(self.path, recursive=True)

    def open_output(self) -> "HashingOutput":
        """A new file, written through: size and SHA-256 are known when it is closed."""
        self.parent.makedirs()
        with self.errors("write it"):
            return HashingOutput(self, self.fs.open_output_stream(self.path))

    def write_bytes(self, data: bytes) -> tuple[int, str]:
        """The whole file at once, atomically: a local file through a temporary name and a rename, an object in
        one PUT (a reader sees the old object or the new one). Returns (size, SHA-256)."""
        if self.is_local:
            tmp = self.sibling(f".{self.name}.tmp-{os.getpid()}")
            with tmp.open_output() as out:
                out.write(data)
            with self.errors("write it"):
                self.fs.move(tmp.path, self.path)
            return out.size, out.sha256
        with self.open_output() as out:
            out.write(data)
        return out.size, out.sha256

    def write_text(self, text: str) -> tuple[int, str]:
        return self.write_bytes(text.encode("utf-8"))

    def remove(self) -> None:
        """Deletes the file or the directory with everything under it; nothing happens when it does not exist."""
        info = self.info()
        with self.errors("delete it"):
            if info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)
            elif info.type == pafs.FileType.Directory:
                self.fs.delete_dir_contents(self.path, missing_dir_ok=True)
                if self.is_local or self.exists():
                    self.fs.delete_dir(self.path)

    def move_to(self, target: "Location") -> None:
        """A rename on the same filesystem (atomic for a local directory; object stores copy, so the commit
        protocol never relies on it there)."""
        with self.errors(f"move it to {target}"):
            self.fs.move(self.path, target.path)

    def sha256(self) -> tuple[int, str]:
        """(size, SHA-256) of the file, read in chunks."""
        digest, size = hashlib.sha256(), 0
        with self.errors("read it"):
            with self.fs.open_input_stream(self.path, compression=None) as stream:
                while block := stream.read(CHUNK):
                    digest.update(block)
                    size += len(block)
        return size, digest.hexdigest()

    def download(self, target: Path) -> Path:
        """Copies this file or directory to the local `target` (for libraries that read only local files)."""
        sources = {"": self.size()} if self.is_file() else self.files()
        if not sources and not self.exists():
            raise MissingError(self.uri, "no such file or directory")
        for name, _ in sources.items():
            destination = target / name if name else target
            destination.parent.mkdir(parents=True, exist_ok=True)
            source = self / name if name else self
            with source.errors("read it"), source.fs.open_input_stream(source.path, compression=None) as stream:
                with open(destination, "wb") as out:
                    while block := stream.read(CHUNK):
                        out.write(block)
        return target

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        """A whole Parquet file, or every Parquet file under a directory."""
        with self.errors("read it as Parquet"):
            return pq.read_table(self.path, columns=columns, filesystem=self.fs)

    def parquet_file(self) -> pq.ParquetFile:
        """A Parquet file opened for reading its footer and row groups (random access)."""
        with self.errors("read it as Parquet"):
            return pq.ParquetFile(self.fs.open_input_file(self.path))

    def write_parquet(self, table: pa.Table, row_group_size: int | None = None) -> tuple[int, str]:
        """One Parquet file (zstd); returns (size, SHA-256)."""
        sink = self.parquet_writer(table.schema)
        sink.write(table, row_group_size)
        return sink.close()

    def parquet_writer(self, schema: pa.Schema) -> "ParquetSink":
        """A Parquet file written table by table (zstd), its size and SHA-256 known when it is closed."""
        return ParquetSink(self, schema)


class ParquetSink:
    """zstd; dictionary pages for text columns only (on ids, lists or not, and on times they made the files larger
    and cost a fifth of the encoding time)."""

    def __init__(self, target: Location, schema: pa.Schema):
        self.target, self.out = target, target.open_output()
        texts = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        with target.errors("write it as Parquet"):
            self.writer = pq.ParquetWriter(self.out, schema, compression="zstd", use_dictionary=texts)

    def write(self, table: pa.Table, row_group_size: int | None = None) -> None:
        with self.target.errors("write it as Parquet"):
            self.writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> tuple[int, str]:
        """(size, SHA-256) of the finished file."""
        with self.target.errors("write it as Parquet"):
            self.writer.close()
        self.out.close()
        return self.out.size, self.out.sha256


class HashingOutput(io.RawIOBase):
    """A write-only file over a filesystem stream that hashes what passes through it, so that a manifest can
    record each file's SHA-256 without reading it back. Errors name the file."""

    def __init__(self, target: Location, stream: pa.NativeFile):
        super().__init__()
        self.target, self.stream = target, stream
        self.digest, self.size = hashlib.sha256(), 0
        self.sha256 = ""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        with self.target.errors("write it"):
            self.stream.write(view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            try:
                with self.target.errors("finish writing it"):
                    self.stream.close()
            finally:
                self.sha256 = self.digest.hexdigest()
                super().close()


def location(where: "str | os.PathLike | Location") -> Location:
    """A Location for a URI, a local path, or a Location (returned as is)."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where) if isinstance(where, os.PathLike) else str(where)
    if not text:
        raise StorageError("''", "an empty path")
    fs, path, scheme = resolve(text)
    return Location(text, fs, path, scheme)
