"""Checkpoint and resume: exact in dev mode, atomic on disk, and surviving a SIGKILLed rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

import towers
from config import LoaderConfig
from data.loader import open_loader
from storage import location
from storage.commit import writing
from tests.conftest import TINY_MODEL, TINY_TOWERS
from trainer.checkpointing import checkpoint, compatibility

ROOT = Path(__file__).resolve().parents[2]
TINY = TINY_MODEL + ["eval.popularity_baseline=false"]



def trainer_cmd(data: Path, ckpt: Path, summary: Path, *extra: str) -> list[str]:
    return ["-m", "trainer", f"data.path={data}", *TINY, f"checkpoint.dir={ckpt}", "--summary", str(summary), *extra]


def test_latest_skips_incomplete_checkpoints(tmp_path):
    for name in ("step-000000010", "step-000000020"):
        with writing(tmp_path / name, checkpoint.KIND) as out:
            out.write_text(checkpoint.STATE_FILE, "{}")
    (tmp_path / ".step-000000030.tmp-1").mkdir()  # interrupted while DCP was writing on a local disk
    (tmp_path / "step-000000040").mkdir()  # written in place, as on an object store, but never committed
    (tmp_path / "step-000000040" / checkpoint.STATE_FILE).write_text("{}")
    assert checkpoint.latest(tmp_path) == location(tmp_path / "step-000000020")
    assert checkpoint.latest(tmp_path / "nowhere") is None


def test_each_config_key_has_the_resume_rule_marked_beside_its_field():
    """config/job.py marks the rules; a section's mark covers the tower's own keys too."""
    from config.job import POSITION, SAFE, SHAPE

    expected = {"model.tower.blocks": SHAPE, "model.item_dim": SHAPE, "loader.history_bags": SHAPE,
                "optim.sparse": SHAPE, "loss.streaming_buckets": SHAPE, "export.dir": SAFE, "tracking.uri": SAFE,
                "train.epochs": SAFE, "data.path": SAFE, "checkpoint.allow_changes": SAFE,
                "loader.batch_size": POSITION, "optim.sparse_lr": "", "loss.temperature": ""}
    assert {key: compatibility.rule(key) for key in expected} == expected


@pytest.mark.slow
@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tiny_data, tmp_path, tower):
    ckpt = tmp_path / "ckpt"
    loader = LoaderConfig(batch_size=64, max_sequence_length=20)
    per_epoch = len(open_loader(tiny_data, loader, layout=towers.get(tower).layout))
    every = 30 if tower == "bags" else 4
    # Streaming logQ too: its estimator's state goes through the checkpoint like the model's.
    args = ["train.epochs=2", "tracking.enabled=false", f"checkpoint.every_steps={every}", "checkpoint.keep_last=10",
            "loss.frequency=streaming", *TINY_TOWERS[tower]]
    subprocess.run([sys.executable, *trainer_cmd(tiny_data, ckpt, tmp_path / "a.json", *args)], cwd=ROOT,
                   check=True, capture_output=True)
    expected = sorted(set(range(every, 2 * per_epoch + 1, every)) | {per_epoch, 2 * per_epoch})
    names = sorted(p.name for p in ckpt.iterdir())
    assert [n for n in names if n.startswith("step-")] == [f"step-{s:09d}" for s in expected], \
        f"a checkpoint every {every} steps and at each epoch end ({per_epoch} batches)"
    assert [n for n in names if n.startswith("best-")] in ([f"best-{per_epoch:09d}"], [f"best-{2 * per_epoch:09d}"]), \
        f"the best epoch's weights, once: {names}"
    resume_step = max(s for s in expected if per_epoch < s < 2 * per_epoch)
    for later in [s for s in expected if s > resume_step]:
        shutil.rmtree(ckpt / f"step-{later:09d}")
    out = subprocess.run([sys.executable, *trainer_cmd(tiny_data, ckpt, tmp_path / "b.json", *args)], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    assert "resumed from" in out and f"epoch 1, batch {resume_step - per_epoch}, step {resume_step}" in out
    first, resumed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert resumed["steps"] == first["steps"] == 2 * per_epoch
    assert resumed["test"] == first["test"] and resumed["history"] == first["history"], "bit-for-bit the same"


def workers_of(agent: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(agent.pid).children(recursive=True) if "trainer" in " ".join(p.cmdline())]


def start_and_kill_a_rank(tiny_data: Path, tmp_path: Path, max_restarts: int, *extra: str):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max_restarts", str(max_restarts), *trainer_cmd(tiny_data, ckpt, tmp_path / "summary.json", *extra)]
    agent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest(ckpt) is None and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.05)
        assert checkpoint.latest(ckpt) is not None, "a checkpoint was written before the kill"
        victims = workers_of(agent)
        assert len(victims) == 2, [p.cmdline() for p in victims]
        killed_at = time.monotonic()
        os.kill(victims[-1].pid, signal.SIGKILL)
        out, _ = agent.communicate(timeout=600)
        return agent.returncode, out, time.monotonic() - killed_at
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_sigkilled_rank_restarts_resumes_and_finishes_in_the_same_run(tiny_data, tmp_path, tower):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    every = 10 if tower == "bags" else 3
    code, out, _ = start_and_kill_a_rank(tiny_data, tmp_path, 1, "train.epochs=3", f"checkpoint.every_steps={every}",
                                         f"tracking.uri={uri}", *TINY_TOWERS[tower])
    assert code == 0, out[-4000:]
    assert "resumed from" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    loader = LoaderConfig(batch_size=64, max_sequence_length=20)
    per_rank = len(open_loader(tiny_data, loader, rank=0, world_size=2, layout=towers.get(tower).layout))
    assert summary["steps"] == 3 * per_rank, "the step count of an uninterrupted run"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("two-tower").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]], "the restart continued the same MLflow run"
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(summary["run_id"], "valid/ndcg_at_10")) == 3


@pytest.mark.slow
def test_killed_rank_without_restarts_fails_the_job_within_the_timeout(tiny_data, tmp_path):
    timeout_s = 30
    code, out, seconds = start_and_kill_a_rank(tiny_data, tmp_path, 0, "train.epochs=3", "checkpoint.every_steps=10",
                                               "tracking.enabled=false", f"train.collective_timeout_s={timeout_s}")
    assert code != 0, out[-3000:]
    assert seconds < timeout_s + 60, f"the job hung for {seconds:.0f} s after the kill"
