"""The storage contract on a local disk, in memory and on a real S3-compatible server over HTTP (moto's, started
here): the same reads and writes, the commit protocol, and one named line for every fault."""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow as pa
import pytest

from storage import MANIFEST_FILE, CommitError, MissingError, StorageError, location, require_committed, verify
from storage.commit import writing
from tests.conftest import s3_environment
from tests.s3server import S3Server


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path):
    """A fresh directory URI on each backend."""
    if request.param == "local":
        return str(tmp_path / "root")
    if request.param == "memory":
        return f"memory://test-{os.getpid()}-{time.monotonic_ns()}"
    return request.getfixturevalue("s3") + "/root"


def test_files_round_trip_on_every_backend(root):
    base = location(root)
    (base / "a" / "b.txt").write_text("hello")
    size, digest = (base / "t.parquet").write_parquet(pa.table({"x": [1, 2, 3]}))
    assert (base / "a" / "b.txt").read_text() == "hello"
    assert (base / "t.parquet").read_parquet().column("x").to_pylist() == [1, 2, 3]
    assert base.files() == {"a/b.txt": 5, "t.parquet": size}
    assert (base / "t.parquet").sha256() == (size, digest), "the hash of what was written is the hash of the file"
    assert [c.name for c in base.children()] == ["a", "t.parquet"]
    base.remove()
    assert base.files() == {} and not (base / "a" / "b.txt").exists()
    with pytest.raises(MissingError) as err:
        (base / "nope.txt").read_bytes()
    assert str(err.value) == f"{base / 'nope.txt'}: no such file or directory"


def test_a_commit_is_the_manifest_written_last(root):
    out = location(root) / "dataset"
    with writing(out, "prepared dataset") as staging:
        staging.write_text("metadata.json", "{}")
        staging.write_parquet("train/part-00000.parquet", pa.table({"x": [1]}))
        assert not (out / MANIFEST_FILE).exists(), "nothing is committed while the write runs"
    manifest = require_committed(out, "prepared dataset", "prepare it")
    assert set(manifest.files) == {"metadata.json", "train/part-00000.parquet"}
    assert verify(out) is None
    assert json.loads((out / MANIFEST_FILE).read_text())["kind"] == "prepared dataset"


def test_a_failed_write_leaves_nothing_that_looks_complete(root):
    out = location(root) / "dataset"
    with writing(out, "export") as staging:
        staging.write_text("old.txt", "v1")
    with pytest.raises(RuntimeError), writing(out, "export") as staging:
        staging.write_text("new.txt", "v2")
        raise RuntimeError("killed")
    if out.is_local:  # a rename commits locally: the previous version is intact until the new one is complete
        assert require_committed(out, "export", "").files.keys() == {"old.txt"}
    else:  # no rename on an object store: the previous version stopped being complete before the write began
        with pytest.raises(CommitError) as err:
            require_committed(out, "export", "export again")
        assert err.value.problem == "nothing there", "the failed write removed what it had written"
    if out.is_local:
        assert [c.name for c in location(root).children()] == ["dataset"], "no temporary directory is left"


@pytest.mark.parametrize("damage", ["manifest", "missing", "resized", "overwritten"])
def test_damage_after_the_commit_is_named(root, damage):
    out = location(root) / "ckpt"
    with writing(out, "checkpoint") as staging:
        staging.write_text("state.json", "{}")
        staging.write_bytes("data.bin", b"0123456789")
    if damage == "manifest":
        (out / MANIFEST_FILE).remove()
    elif damage == "missing":
        (out / "data.bin").remove()
    elif damage == "resized":
        (out / "data.bin").write_bytes(b"0123")
    else:
        (out / "data.bin").write_bytes(b"9876543210")
    expected = {"manifest": "no _manifest.json", "missing": "data.bin is missing",
                "resized": "data.bin has 4 bytes, but 10 were committed",
                "overwritten": "data.bin does not match its SHA-256"}[damage]
    assert expected in verify(out)
    if damage != "overwritten":  # opening checks sizes only; the SHA-256 is for verification
        with pytest.raises(CommitError) as err:
            require_committed(out, "checkpoint", "write it again")
        assert str(err.value).startswith(f"{out}: not a complete checkpoint: ") and expected in str(err.value)


def test_local_temporaries_of_a_killed_writer_are_removed_by_the_next(tmp_path):
    out = location(tmp_path / "x")
    dead = tmp_path / ".x.tmp-999999999"  # no such process: a writer killed with -9
    dead.mkdir()
    (dead / "part").write_text("half")
    with writing(out, "export") as staging:
        staging.write_text("a", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_unknown_schemes_and_empty_paths_are_named():
    with pytest.raises(StorageError) as err:
        location("ftp://host/x")
    assert "unknown scheme 'ftp://'" in str(err.value)
    with pytest.raises(StorageError):
        location("")


# Faults of an S3 store: each is one line naming the URI and the cause.

def test_a_missing_bucket_is_named(s3):
    with pytest.raises(MissingError) as err:
        location("s3://no-such-bucket-here/x/y.txt").read_bytes()
    assert str(err.value) == "s3://no-such-bucket-here/x/y.txt: the bucket 'no-such-bucket-here' does not exist"
    with pytest.raises(StorageError) as err:
        location("s3://no-such-bucket-here/x/y.txt").write_text("x")
    assert "the bucket 'no-such-bucket-here' does not exist" in str(err.value)


def test_an_unreachable_endpoint_is_named_after_retries(monkeypatch):
    from trainer.distributed import free_port

    s3_environment(monkeypatch, f"http://127.0.0.1:{free_port()}")
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        location("s3://bucket/x.txt").read_bytes()
    message = str(err.value)
    assert message.startswith("s3://bucket/x.txt: cannot ") and "cannot reach http://127.0.0.1:" in message
    assert "AWS_ENDPOINT_URL" in message and "\n" not in message
    assert time.monotonic() - start < 60


@pytest.fixture(scope="module")
def iam_server(tmp_path_factory):
    """A server that checks credentials and permissions (its first requests, which set up users, are free)."""
    server = S3Server(tmp_path_factory.mktemp("moto-iam"), {"INITIAL_NO_AUTH_ACTION_COUNT": "7"})
    import boto3

    iam = boto3.client("iam", endpoint_url=server.endpoint, aws_access_key_id="x", aws_secret_access_key="y",
                       region_name="us-east-1")
    keys = {}
    for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:ListBucket"])):
        iam.create_user(UserName=user)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    server.client(*keys["writer"]).create_bucket(Bucket="guarded")
    yield server, keys
    server.stop()


def test_access_denied_wrong_and_missing_credentials_are_named(iam_server, monkeypatch):
    server, keys = iam_server
    s3_environment(monkeypatch, server.endpoint, *keys["writer"])
    location("s3://guarded/ok.txt").write_text("fine")
    s3_environment(monkeypatch, server.endpoint, *keys["reader"])
    with pytest.raises(StorageError) as err:
        location("s3://guarded/x.txt").write_text("no")
    assert str(err.value).startswith("s3://guarded/x.txt: cannot write it: access denied")
    s3_environment(monkeypatch, server.endpoint, "AKIANOSUCHKEY", "nope")
    with pytest.raises(StorageError) as err:
        location("s3://guarded/x.txt").write_text("no")
    assert "rejected the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" in str(err.value)
    s3_environment(monkeypatch, server.endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(StorageError) as err:
        location("s3://guarded/ok.txt").read_bytes()
    assert "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_a_store_that_goes_away_mid_write_fails_the_write_naming_it(tmp_path, monkeypatch):
    """Requests are retried with backoff (AWS_MAX_ATTEMPTS), then the write fails with the URI; the commit never
    happens, so nothing the write left looks complete."""
    server = S3Server(tmp_path)
    s3_environment(monkeypatch, server.endpoint)
    server.client().create_bucket(Bucket="flaky")
    out = location("s3://flaky/dataset")
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with writing(out, "prepared dataset") as staging:
                for i in range(10_000):
                    staging.write_bytes(f"part-{i:05d}", os.urandom(1 << 16))
        except StorageError as err:
            errors.append(err)

    thread = threading.Thread(target=write)
    thread.start()
    while not server.client().list_objects_v2(Bucket="flaky").get("KeyCount"):
        time.sleep(0.01)
    server.stop()
    thread.join(120)
    assert not thread.is_alive(), "the write gave up after its retries"
    assert len(errors) == 1 and str(errors[0]).startswith("s3://flaky/dataset/part-")
    assert "cannot reach" in str(errors[0])
    assert "\n" not in str(errors[0])
