"""Faults that must cost no step and give no silent result: a rank killed on either node of a 2-node
job, checkpoints truncated or overwritten, a resume with another config, a diverging loss, and the
root cause of a failure. Real processes and real files; every wait is bounded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from config import ConfigError, LoaderConfig
from data.loader import open_loader
from storage import location
from storage.location import HashingOutput
from tests.conftest import ROOT, TINY_MODEL, recommit, tiny_config
from trainer.checkpointing import checkpoint
from trainer.checkpointing.checkpoint import CheckpointError
from trainer.distributed import WholeErrorFile
from trainer.loop import TrainingError, train

TORCHX = str(Path(sys.executable).with_name("torchx"))
TINY = [*TINY_MODEL, "eval.popularity_baseline=false", "tracking.enabled=false"]


def torchx_job(tmp_path: Path, data: Path, max_restarts: int, *extra: str) -> subprocess.Popen:
    cmd = [TORCHX, "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx'}", "--wait", "--log",
           "launch/components.py:train", "--nnodes", "2",
           "--nproc_per_node", "1", "--max_restarts", str(max_restarts), "--", f"data.path={data}", *TINY,
           f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every_steps=10", *extra]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def end_job(job: subprocess.Popen) -> None:
    """SIGKILLs the job and every process it started. torchx's local scheduler starts each node's agent in its own
    process group, so killing torchx's group alone left an agent (and a stopped worker) running after the test."""
    try:
        tree = psutil.Process(job.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
    for process in tree:
        try:
            process.kill()
        except psutil.Error:
            continue
    job.wait(timeout=60)


def kill_rank_after_first_checkpoint(job: subprocess.Popen, ckpt: Path, rank: int,
                                     sig: signal.Signals = signal.SIGKILL) -> float:
    """SIGKILLs (or sends `sig` to) the worker of `rank` once a checkpoint exists; returns when it did."""
    deadline = time.monotonic() + 300
    while checkpoint.latest(ckpt) is None and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.latest(ckpt) is not None, "a checkpoint was written before the kill"
    workers = {}
    while len(workers) < 2 and time.monotonic() < deadline:
        for p in psutil.Process(job.pid).children(recursive=True):
            try:
                line = " ".join(p.cmdline())
                if "-m trainer" in line and "launch.run" not in line:
                    workers[int(p.environ()["RANK"])] = p
            except (psutil.Error, KeyError):
                continue
    workers[rank].send_signal(sig)
    return time.monotonic()


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_a_two_node_job_survives_a_killed_rank_on_either_node(tiny_data, tmp_path, rank):
    """Two torchrun agents (2x1, torchx local_cwd), rank `rank` SIGKILLed: the restart resumes on both nodes,
    in bounded time, and the job trains exactly the steps of an uninterrupted run."""
    job = torchx_job(tmp_path, tiny_data, 1, "train.epochs=2", "train.collective_timeout_s=60",
                     f"--summary={tmp_path / 's.json'}")
    try:
        killed = kill_rank_after_first_checkpoint(job, tmp_path / "ckpt", rank)
        job.wait(timeout=300)
        seconds = time.monotonic() - killed
    finally:
        end_job(job)
    log = (tmp_path / "job.log").read_text()
    assert job.returncode == 0, log[-4000:]
    assert "resumed from" in log and seconds < 120, f"recovered in {seconds:.0f} s"
    per_rank = len(open_loader(tiny_data, LoaderConfig(batch_size=64), rank=0, world_size=2))
    assert json.loads((tmp_path / "s.json").read_text())["steps"] == 2 * per_rank


@pytest.mark.slow
def test_a_killed_rank_is_the_reported_root_cause(tiny_data, tmp_path):
    """Without restarts the job fails; torchx names the killed rank and its signal, not the other node's
    broken connection."""
    job = torchx_job(tmp_path, tiny_data, 0, "train.epochs=2")
    try:
        kill_rank_after_first_checkpoint(job, tmp_path / "ckpt", 1)
        job.wait(timeout=300)
    finally:
        end_job(job)
    log = (tmp_path / "job.log").read_text()
    assert job.returncode != 0
    status = log[log.index("AppStatus"):]
    assert "rank 1 (local rank 0" in status and "SIGKILL" in status, status[:2000]
    assert "Connection reset" not in status and "RendezvousConnectionError" not in status


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_naming_the_rank_and_the_timeout(tiny_data, tmp_path):
    """A rank that stops answering (SIGSTOP: alive, silent) is no crash torchrun can see; the others' next
    collective times out after train.collective_timeout_s, and that is the error: one line naming the rank and the
    setting, not gloo's bare "Timed out waiting" traceback. (The stopped rank's own agent never sees it exit, so
    the test ends the job once the error is out.)"""
    job = torchx_job(tmp_path, tiny_data, 0, "train.epochs=3", "train.collective_timeout_s=10")
    expected = "rank 0: a collective operation waited train.collective_timeout_s=10 s for the other ranks and gave up"
    log = tmp_path / "job.log"
    try:
        kill_rank_after_first_checkpoint(job, tmp_path / "ckpt", 1, signal.SIGSTOP)
        deadline = time.monotonic() + 180
        while f"error: {expected}" not in log.read_text() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        end_job(job)
    text = log.read_text()
    line = next((x for x in text.splitlines() if f"error: {expected}" in x), None)
    assert line is not None, text[-3000:]
    assert line.endswith(")") and "backend: " in line and "Traceback" not in line, line


def test_a_rank_killed_while_writing_its_error_file_leaves_none_torchrun_cannot_parse(tmp_path, monkeypatch):
    """torchrun's agent SIGTERMs the surviving ranks when one dies, and parses each rank's error file; a rank
    killed mid-write once left an empty file that crashed the agent, so the job was not restarted."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    write = HashingOutput.write

    def killed_halfway(self, data):
        write(self, bytes(data)[: len(data) // 2])
        raise KeyboardInterrupt("SIGTERM while writing")

    try:
        raise RuntimeError("gloo: connection reset by peer")
    except RuntimeError as err:
        monkeypatch.setattr(HashingOutput, "write", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            WholeErrorFile().record_exception(err)
        monkeypatch.setattr(HashingOutput, "write", write)
        assert not error_file.exists(), "torchrun's agent reads an absent file as 'no error file'"
        WholeErrorFile().record_exception(err)
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=1, error_file=str(error_file))
    assert failure.message["message"] == "RuntimeError: gloo: connection reset by peer"


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One dev-mode epoch with a checkpoint every 20 steps: the material for the checkpoint faults."""
    ckpt = tmp_path_factory.mktemp("faults") / "ckpt"
    summary = train(tiny_config(tiny_data, **settings(ckpt)))
    return SimpleNamespace(ckpt=ckpt, summary=summary, data=tiny_data)


def settings(ckpt: Path, **overrides) -> dict:
    return {"checkpoint.dir": ckpt, "checkpoint.every_steps": 20, "checkpoint.keep_last": 10, "train.epochs": 1,
            "eval.popularity_baseline": "false", **overrides}


def copy(trained, tmp_path: Path) -> Path:
    """A copy of the trained job's checkpoints; the newest is the epoch end (step 71)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.ckpt, ckpt)
    return ckpt


def resume(trained, ckpt: Path, **overrides) -> dict:
    return train(tiny_config(trained.data, **settings(ckpt, **overrides)))


def shard(path) -> Path:
    return next(location(path).local_path.glob("*.distcp"))


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(trained, tmp_path, caplog, damage):
    ckpt = copy(trained, tmp_path)
    newest = checkpoint.latest(ckpt)
    data = bytearray(shard(newest).read_bytes())
    if damage == "truncate":
        shard(newest).write_bytes(data[:len(data) // 2])
    else:
        data[len(data) // 2:len(data) // 2 + 4096] = os.urandom(4096)
        shard(newest).write_bytes(bytes(data))
    summary = resume(trained, ckpt, **{"train.epochs": 2})
    reason = "bytes" if damage == "truncate" else "does not match its SHA-256"
    assert f"skipping checkpoint {newest}" in caplog.text and reason in caplog.text
    assert summary["history"][0] == trained.summary["history"][0], "epoch 0 redone from step 60, exactly"
    assert summary["steps"] == 2 * trained.summary["steps"]


def test_a_damaged_newest_checkpoint_on_s3_is_skipped_for_the_previous_one(trained, s3, caplog):
    """The same fallback on an object store: checkpoints verified there, file by file, before the resume."""
    ckpt, source = location(f"{s3}/ckpt"), location(trained.ckpt)
    for name in source.files():
        (ckpt / name).write_bytes((source / name).read_bytes())
    newest = checkpoint.latest(ckpt)
    shard = newest / next(n for n in newest.files() if n.endswith(".distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    summary = resume(trained, ckpt.uri, **{"train.epochs": 2})
    assert f"skipping checkpoint {newest}" in caplog.text and "bytes" in caplog.text
    assert summary["history"][0] == trained.summary["history"][0], "epoch 0 redone from the previous checkpoint"
    assert summary["steps"] == 2 * trained.summary["steps"]


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(trained, tmp_path):
    ckpt = copy(trained, tmp_path)
    for path in checkpoint.complete_checkpoints(location(ckpt)):
        shard(path).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint under .* verifies.*move them away"):
        resume(trained, ckpt)


def test_a_non_finite_loss_stops_training_naming_the_step(tiny_data):
    expected = r"the loss is (nan|inf) at step 1 \(epoch 0, batch 0\).*not bad input data"
    with pytest.raises(TrainingError, match=expected):
        train(tiny_config(tiny_data, **{"loss.temperature": 1e-38, "eval.popularity_baseline": "false"}))


@pytest.mark.parametrize("override,expected", [
    ({"model.item_dim": 32}, "model.item_dim: 16 -> 32 (changes the checkpoint's tensors"),
    ({"optim.sparse": "sgd"}, "optim.sparse: rowwise_adagrad -> sgd (changes the checkpoint's tensors"),
    ({"model.tower.share_item_table": "false"},
     "model.tower.share_item_table: True -> False (changes the checkpoint's tensors"),
    ({"optim.sparse_lr": 0.1},
     "optim.sparse_lr: 0.05 -> 0.1 (allow it with checkpoint.allow_changes=[optim.sparse_lr]"),
])
def test_a_changed_config_is_refused_naming_the_keys(trained, tmp_path, override, expected):
    with pytest.raises(ConfigError, match="cannot resume from") as err:
        resume(trained, copy(trained, tmp_path), **{"train.epochs": 2, **override})
    assert expected in str(err.value)


def test_allowed_and_safe_changes_resume_and_are_printed(trained, tmp_path, capsys):
    summary = resume(trained, copy(trained, tmp_path), **{"train.epochs": 2, "optim.sparse_lr": 0.1,
                                                          "checkpoint.allow_changes": "[optim.sparse_lr]"})
    assert summary["steps"] == 2 * trained.summary["steps"]
    out = capsys.readouterr().out
    assert "with changes:" in out and "optim.sparse_lr: 0.05 -> 0.1" in out and "train.epochs: 1 -> 2" in out


def test_batch_size_and_world_size_change_only_at_an_epoch_boundary(trained, tmp_path):
    ckpt = copy(trained, tmp_path)
    shutil.rmtree(checkpoint.latest(ckpt).local_path)  # the newest is now mid-epoch (step 60)
    for allowed in ("[]", "[loader.batch_size]"):  # the first answer is the one that works, allowed or not yet
        with pytest.raises(ConfigError) as err:
            resume(trained, ckpt, **{"train.epochs": 2, "loader.batch_size": 32, "checkpoint.allow_changes": allowed})
        assert ("loader.batch_size: 64 -> 32 (changes what the saved batch position means: resume from an epoch-end "
                "checkpoint, with checkpoint.allow_changes=[loader.batch_size])") in str(err.value)
    state = checkpoint.latest(ckpt).local_path / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 2}))  # as if 2 ranks wrote it
    recommit(state.parent, checkpoint.KIND)
    with pytest.raises(ConfigError, match="world size: 2 -> 1 .the checkpoint stopped mid-epoch.*resume with 2"):
        resume(trained, ckpt, **{"train.epochs": 2})


def test_the_batch_size_may_change_at_an_epoch_boundary(trained, tmp_path):
    summary = resume(trained, copy(trained, tmp_path), **{"train.epochs": 2, "loader.batch_size": 32,
                                                          "checkpoint.allow_changes": "[loader.batch_size]"})
    assert summary["steps"] == trained.summary["steps"] + len(open_loader(trained.data, LoaderConfig(batch_size=32)))


def test_other_data_is_refused(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained.data, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["source"]["checksum"] = "0" * 64
    (other / "metadata.json").write_text(json.dumps(meta))
    recommit(other)  # data prepared anew, committed as prepare commits it
    with pytest.raises(ConfigError, match="is not the data it was trained on"):
        train(tiny_config(other, **settings(copy(trained, tmp_path), **{"train.epochs": 2})))
