"""The pyarrow filesystem behind a URI, and its errors in the user's terms.

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
such file, no such bucket, access denied, missing credentials, an endpoint that cannot be reached)."""

from __future__ import annotations

import os
import re

import pyarrow as pa
import pyarrow.fs as pafs

REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "memory")


DEFAULT_MAX_ATTEMPTS = 5


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
