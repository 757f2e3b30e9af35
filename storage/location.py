"""A URI as a pyarrow filesystem and a path, with the reads and writes the project needs.

Accepted: local paths and `file://`, `s3://` (any S3-compatible store), `gs://`, `hdfs://`/`viewfs://`,
and `memory://` (in-process, for tests). Endpoints, regions and credentials come from the environment
every tool of that store reads, never from a config file that gets logged:

- S3: `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (a non-AWS endpoint such as MinIO), `AWS_REGION` or
  `AWS_DEFAULT_REGION`, the SDK's credential chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
  `AWS_PROFILE`, web identity, instance roles), and `AWS_MAX_ATTEMPTS` (default 5): every request is
  retried with exponential backoff before it fails;
- GCS: Google's default credentials (`GOOGLE_APPLICATION_CREDENTIALS`);
- HDFS: Hadoop's own configuration (`HADOOP_HOME`, `CLASSPATH`, `HADOOP_CONF_DIR`).

Every failure is a `StorageError`: one line naming the URI and what went wrong in the user's terms (no
such file, no such bucket, access denied, missing credentials, an endpoint that cannot be reached).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "memory")
DEFAULT_MAX_ATTEMPTS = 5
CHUNK = 1 << 22  # bytes per read when hashing or copying


class StorageError(OSError):
    """A storage operation failed; the message is one line naming the URI."""

    def __init__(self, uri: str, problem: str):
        self.uri, self.problem = str(uri), problem
        super().__init__(f"{uri}: {problem}")

    def __str__(self) -> str:
        return f"{self.uri}: {self.problem}"


class MissingError(StorageError, FileNotFoundError):
    """The file or directory does not exist."""


def aws_credentials_visible() -> bool:
    """Whether the standard AWS environment names any credentials (an instance role cannot be seen from here)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    return any(os.environ.get(n) for n in names) or any(os.path.isfile(os.path.expanduser(f)) for f in files)


def s3_endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def explain(err: BaseException, uri: str, scheme: str) -> tuple[str, bool]:
    """(the problem in the user's terms, whether it means "does not exist") for a filesystem error."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if "NO_SUCH_BUCKET" in text or re.search(r"Bucket '[^']*' not found", text):
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        return f"the bucket '{bucket}' does not exist", True
    if isinstance(err, FileNotFoundError) or "Path does not exist" in text or "NoSuchKey" in text:
        return "no such file or directory", True
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not connect" in text:
        where = s3_endpoint() or "the store's endpoint"
        detail = re.search(r"curlCode: \d+, ([^;]+)", text)
        return (f"cannot reach {where} (AWS_ENDPOINT_URL for S3-compatible stores) after retries"
                f"{': ' + detail.group(1) if detail else ''}"), False
    denied = ("ACCESS_DENIED", "AccessDenied", "HTTP status 403", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
              "PERMISSION_DENIED", "Permission denied")
    anonymous_refused = "HTTP status 500" in text or any(d in text for d in denied)
    if scheme == "s3" and anonymous_refused and not aws_credentials_visible():
        return ("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run "
                "where an instance role provides them"), False
    if "INVALID_ACCESS_KEY_ID" in text or "SIGNATURE_DOES_NOT_MATCH" in text:
        return "the store rejected the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)", False
    if any(d in text for d in denied) or isinstance(err, PermissionError):
        return "access denied (the credentials in the environment may not do this here)", False
    return first, False


def failure(err: BaseException, uri: str, scheme: str, action: str) -> StorageError:
    problem, missing = explain(err, uri, scheme)
    cls = MissingError if missing else StorageError
    return cls(uri, problem if missing else f"cannot {action}: {problem}")


_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}


def s3_filesystem() -> pafs.FileSystem:
    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    key = ("s3", endpoint, region, attempts, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"))
    if key not in _FILESYSTEMS:
        options = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
        if endpoint:
            options["endpoint_override"] = endpoint
        if region:
            options["region"] = region
        _FILESYSTEMS[key] = pafs.S3FileSystem(**options)
    return _FILESYSTEMS[key]


def memory_filesystem() -> pafs.FileSystem:
    if ("memory",) not in _FILESYSTEMS:
        from fsspec.implementations.memory import MemoryFileSystem

        _FILESYSTEMS[("memory",)] = pafs.PyFileSystem(pafs.FSSpecHandler(MemoryFileSystem()))
    return _FILESYSTEMS[("memory",)]


def split_uri(text: str) -> tuple[str, str]:
    """(scheme, rest) of a URI; ("", path) for a local path (a Windows drive letter is not a scheme)."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+)://(.*)$", text)
    return (match.group(1).lower(), match.group(2)) if match else ("", text)


def resolve(text: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, its path, the scheme) of a URI or local path."""
    scheme, rest = split_uri(text)
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(rest if scheme else text)), ""
    if scheme == "s3":
        return s3_filesystem(), rest.rstrip("/"), scheme
    if scheme == "memory":
        return memory_filesystem(), "/" + rest.strip("/"), scheme
    if scheme in ("gs", "gcs", "hdfs", "viewfs"):
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, pa.ArrowException) as err:
            needs = ("Hadoop's libhdfs and CLASSPATH (HADOOP_HOME)" if scheme in ("hdfs", "viewfs")
                     else "Google's default credentials (GOOGLE_APPLICATION_CREDENTIALS)")
            raise StorageError(text, f"cannot open the {scheme} filesystem ({needs}): {str(err).splitlines()[0]}") \
                from None
        return fs, path.rstrip("/"), scheme
    raise StorageError(text, f"unknown scheme '{scheme}://' (accepted: a local path, file://, "
                             f"{', '.join(s + '://' for s in REMOTE_SCHEMES)})")


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
