"""The whole path on an object store, as a cluster job runs it: a raw log on s3:// -> prepare (embedded and Spark)
-> two ranks training from s3:// with checkpoints on s3:// -> one rank killed -> resume from s3:// -> export to
s3:// -> recommend from s3://. The metrics equal those of the same job on a local disk.

The store is moto's S3-compatible server over HTTP (tests/conftest.py), reached through the same standard
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) a real cluster uses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from data.synthetic import SyntheticConfig, generate
from storage import location
from tests.conftest import ROOT, TINY_MODEL
from tests.data.test_engines import assert_same_dataset
from tests.e2e.test_checkpoint import workers_of
from trainer.checkpointing import checkpoint

JOB = TINY_MODEL + ["train.epochs=2", "checkpoint.every_steps=3", "tracking.enabled=false", "export.enabled=true",
                    "export.recall_queries=200", "eval.popularity_baseline=false"]


def raw_log(where, parts: int = 3) -> None:
    """A synthetic click log as Spark would leave it: Parquet parts and a _SUCCESS marker."""
    events = generate(SyntheticConfig(num_users=400, num_items=150, mean_events=12, num_topics=8)).events
    table = pa.table({"user_id": events.column("user"), "item_id": events.column("item"),
                      "event_time": pa.array(events.column("ts").to_numpy().astype("datetime64[s]"))})
    bounds = np.linspace(0, table.num_rows, parts + 1).astype(int)
    for part in range(parts):
        (where / f"part-{part:05d}.parquet").write_parquet(table.slice(bounds[part], bounds[part + 1] - bounds[part]))
    (where / "_SUCCESS").write_bytes(b"")


def prepare(raw: str, out: str, *engine: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "data.prepare", "interactions", raw, "--user-col", "user_id",
                             "--item-col", "item_id", "--time-col", "event_time", "--out", out, *engine],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun(data: str, ckpt: str, exports: str, summary, restarts: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max_restarts",
           str(restarts), "-m", "trainer", f"data.path={data}", f"checkpoint.dir={ckpt}", f"export.dir={exports}",
           *JOB, "--summary", str(summary)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def recommend(export: str) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "serving.recommend", "--run", export, "--history", "3,7,11",
                             "-k", "10", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.slow
def test_raw_log_to_recommendations_on_s3_equals_the_local_disk(s3, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("the Spark step needs a JVM: no `java` on PATH")
    raw_log(location(f"{s3}/raw/clicks"))
    embedded = prepare(f"{s3}/raw/clicks", f"{s3}/prepared/clicks")
    assert f"prepared {s3}/prepared/clicks:" in embedded.stdout
    prepare(f"{s3}/raw/clicks", f"{s3}/prepared/clicks-spark", "--engine", "spark", "--master", "local[2]")
    assert_same_dataset(f"{s3}/prepared/clicks", f"{s3}/prepared/clicks-spark", ignore=("engine",))

    local_raw = tmp_path / "raw"
    location(f"{s3}/raw/clicks").download(local_raw)
    prepare(str(local_raw), str(tmp_path / "prepared"))
    reference = torchrun(str(tmp_path / "prepared"), str(tmp_path / "ckpt"), str(tmp_path / "exports"),
                         tmp_path / "local.json", 0)
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

    job = torchrun(f"{s3}/prepared/clicks", f"{s3}/ckpt", f"{s3}/exports", tmp_path / "s3.json", 1)
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest(f"{s3}/ckpt") is None and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert checkpoint.latest(f"{s3}/ckpt") is not None, "a checkpoint reached the store before the kill"
        victims = workers_of(job)
        assert len(victims) == 2
        os.kill(victims[-1].pid, signal.SIGKILL)
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out[-4000:]
    assert f"resumed from {s3}/ckpt/step-" in out

    local, remote = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "s3"))
    assert remote["steps"] == local["steps"]
    assert remote["history"] == local["history"] and remote["test"] == local["test"], \
        "the job on the store, killed and resumed, gives the metrics of the job on the local disk"
    export = remote["export"]["dir"]
    assert export.startswith(f"{s3}/exports/") and location(export).is_dir()
    assert recommend(export) == recommend(local["export"]["dir"])
