"""What each fault costs, measured on real processes and files (docs/reliability.md).

    python -m bench.faults [--repeats 5] [--out bench/results/faults.json]

- a rank SIGKILLed on either node of a 2-node job (torchx local_cwd 2x1, --max_restarts 1), `--repeats`
  times each: whether it recovered, seconds from the kill to the resumed training, wall seconds lost
  against an uninterrupted run, and steps redone (the steps logged twice to MLflow);
- the newest checkpoint truncated, or 4 KiB inside it overwritten: the checkpoint skipped, the steps
  redone, the seconds of the resumed job;
- the MLflow server SIGKILLed mid-run and back 20 s later: metric points lost, extra seconds;
- the MLflow server gone after the last validation: records left in the outbox, then lost after replay.
Writes the JSON; every job runs with the tiny test model on a small synthetic dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from bench.common import machine
from tests.conftest import TINY_MODEL
from tests.e2e.test_tracking import Server
from trainer.checkpointing import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TORCHX = str(Path(sys.executable).with_name("torchx"))
TINY = [*TINY_MODEL, "eval.popularity_baseline=false"]


def prepare(directory: Path) -> Path:
    data = directory / "data"
    subprocess.run([sys.executable, "-m", "data.prepare", "synthetic", "--users", "800", "--items", "300",
                    "--mean-events", "15", "--out", str(data)], cwd=ROOT, check=True, capture_output=True)
    return data


def two_node_job(work: Path, data: Path, uri: str, extra: list[str]) -> subprocess.Popen:
    cmd = [TORCHX, "run", "-s", "local_cwd", "-cfg", f"log_dir={work / 'torchx'}", "--wait", "--log",
           "launch/components.py:train", "--nnodes", "2",
           "--nproc_per_node", "1", "--max_restarts", "1", "--", f"data.path={data}", *TINY,
           f"checkpoint.dir={work / 'ckpt'}", "checkpoint.every_steps=10", "train.epochs=2", "train.log_every=1",
           f"tracking.uri={uri}", f"tracking.outbox={work / 'outbox'}", *extra]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=open(work / "job.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def worker(job: subprocess.Popen, rank: int) -> psutil.Process | None:
    for p in psutil.Process(job.pid).children(recursive=True):
        try:
            line = " ".join(p.cmdline())
            if "-m trainer" in line and "launch.run" not in line and int(p.environ()["RANK"]) == rank:
                return p
        except (psutil.Error, KeyError):
            continue
    return None


def redone(uri: str) -> int:
    """Steps whose train/loss was logged twice: run once before the kill, once after the resume. A lower
    bound when rank 0 was the one killed: the records its logger had not sent yet died with it."""
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("two-tower").experiment_id])[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    return len(steps) - len(set(steps))


def kill_run(data: Path, rank: int | None) -> dict:
    """One 2x1 job; rank `rank` SIGKILLed when the first checkpoint appears (None: uninterrupted)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        uri = f"sqlite:///{work / 'mlflow.db'}"
        start = time.monotonic()
        job = two_node_job(work, data, uri, [])
        result: dict = {"killed_rank": rank}
        if rank is not None:
            while checkpoint.latest(work / "ckpt") is None and job.poll() is None:
                time.sleep(0.02)
            time.sleep(1.0)  # a second of steps past the checkpoint, which the restart redoes
            victim = worker(job, rank)
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            while "resumed from" not in (work / "job.log").read_text() and job.poll() is None:
                time.sleep(0.1)
            result["seconds_to_resume"] = round(time.monotonic() - killed, 1)
        job.wait(timeout=900)
        result.update(recovered=job.returncode == 0, seconds=round(time.monotonic() - start, 1),
                      steps_redone=redone(uri) if job.returncode == 0 else None)
        return result


def checkpoint_run(data: Path, damage: str) -> dict:
    """A dev-mode epoch checkpointed every 20 steps, its newest checkpoint damaged, then resumed."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = [sys.executable, "-m", "trainer", f"data.path={data}", *TINY, "tracking.enabled=false",
                f"checkpoint.dir={work / 'ckpt'}", "checkpoint.every_steps=20", "checkpoint.keep_last=10"]
        subprocess.run(base + ["train.epochs=1"], cwd=ROOT, check=True, capture_output=True)
        newest = checkpoint.latest(work / "ckpt").local_path
        shard = next(newest.glob("*.distcp"))
        raw = bytearray(shard.read_bytes())
        if damage == "truncated":
            shard.write_bytes(raw[:len(raw) // 2])
        else:
            raw[len(raw) // 2:len(raw) // 2 + 4096] = os.urandom(4096)
            shard.write_bytes(bytes(raw))
        start = time.monotonic()
        out = subprocess.run(base + ["train.epochs=2"], cwd=ROOT, capture_output=True, text=True)
        resumed = next(line for line in out.stdout.splitlines() if line.startswith("resumed from"))
        step = int(resumed.rsplit("step ", 1)[1].split(",")[0])
        return {"damage": damage, "recovered": out.returncode == 0, "skipped": newest.name,
                "skip_reason": next((line.split(": ", 2)[-1] for line in out.stderr.splitlines()
                                     if "skipping checkpoint" in line), None),
                "resumed_from_step": step, "steps_redone": int(newest.name[len(checkpoint.PREFIX):]) - step,
                "seconds": round(time.monotonic() - start, 1)}


def tracking_run(data: Path, outage: str) -> dict:
    """The MLflow server SIGKILLed mid-run and back after 20 s, or gone after the last validation."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Server(work)
        epochs = 8 if outage == "mid-run" else 2  # long enough for the server to come back while training
        flush = 60 if outage == "mid-run" else 5  # at the end: the server stays down past the flush
        cmd = [sys.executable, "-m", "trainer", f"data.path={data}", *TINY, f"train.epochs={epochs}",
               "train.log_every=1", f"tracking.uri={server.uri}", "tracking.request_timeout_s=2",
               f"tracking.flush_timeout_s={flush}",
               f"tracking.outbox={work / 'outbox'}", "--summary", str(work / "s.json")]
        start = time.monotonic()
        job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = []
        for line in job.stdout:
            lines.append(line)
            if outage == "mid-run" and line.startswith("epoch 0 step"):
                server.stop(signal.SIGKILL)
                time.sleep(20)
                server.start()
            if outage == "at the end" and line.startswith(f"epoch {epochs - 1} step"):
                server.stop(signal.SIGKILL)
        job.wait()
        seconds = time.monotonic() - start
        outbox = list((work / "outbox").glob("*.jsonl"))
        result = {"outage": outage, "epochs": epochs, "finished": job.returncode == 0, "seconds": round(seconds, 1),
                  "records_in_outbox": outbox_records(outbox)}
        if outbox:
            server.start()
            replay = subprocess.run([sys.executable, "-m", "trainer.tracking", "replay", str(outbox[0])], cwd=ROOT,
                                    capture_output=True, text=True)
            result["replayed"] = replay.returncode == 0
        client = MlflowClient(server.uri)
        run = client.search_runs([client.get_experiment_by_name("two-tower").experiment_id])[0]
        steps = json.loads((work / "s.json").read_text())["steps"]
        logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
        result.update(status=run.info.status, train_loss_points_lost=steps - len(logged),
                      test_metrics_present="best/test_hr_at_10" in run.data.metrics)
        server.stop()
        return result


def outbox_records(outbox: list[Path]) -> int:
    return sum(len(p.read_text().splitlines()) - 1 for p in outbox)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    parser.add_argument("--only", choices=["two_node", "checkpoints", "tracking"],
                        help="run one group of scenarios and update only its part of the JSON")
    args = parser.parse_args()
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.only and out.exists() else {}
    result["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp))
        if args.only in (None, "two_node"):
            result.update(two_node(data, args.repeats))
        if args.only in (None, "checkpoints"):
            result["checkpoints"] = [checkpoint_run(data, damage) for damage in ("truncated", "overwritten")]
        if args.only in (None, "tracking"):
            result["tracking"] = [tracking_run(data, outage) for outage in ("mid-run", "at the end")]
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("two_node_summary", "checkpoints", "tracking") if k in result}, indent=2))


def two_node(data: Path, repeats: int) -> dict:
    baseline = [kill_run(data, None) for _ in range(2)]
    kills = [kill_run(data, rank) for _ in range(repeats) for rank in (0, 1)]
    base_s = statistics.median(r["seconds"] for r in baseline)
    for run in kills:
        run["seconds_lost"] = round(run["seconds"] - base_s, 1)
    summary = {f"rank {rank}": {
        "recovered": f"{sum(r['recovered'] for r in kills if r['killed_rank'] == rank)} of {repeats}",
        "median_seconds_to_resume": statistics.median(r["seconds_to_resume"] for r in kills
                                                      if r["killed_rank"] == rank),
        "median_seconds_lost": statistics.median(r["seconds_lost"] for r in kills if r["killed_rank"] == rank),
        "max_steps_redone": max((r["steps_redone"] or 0) for r in kills if r["killed_rank"] == rank)}
        for rank in (0, 1)}
    return {"two_node_baseline": baseline, "two_node_kills": kills, "two_node_summary": summary}


if __name__ == "__main__":
    main()
