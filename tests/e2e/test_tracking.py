"""MLflow for real: a loopback `mlflow server`, a server that dies mid-training, and the demo's run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from config import TrackingConfig
from tests.conftest import TINY_MODEL
from trainer.distributed import free_port
from trainer.tracking.mlflow_logger import MlflowLogger
from trainer.tracking.records import MAX_METRICS_PER_BATCH, leading_batch

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
TINY = TINY_MODEL



class Server:
    """`mlflow server` on a loopback port with a sqlite backend, as a user would start it; it can be
    stopped and started again on the same port and store, like a real outage."""

    def __init__(self, workdir: Path):
        self.workdir, self.port = workdir, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.workdir / 'server.db'}",
             "--default-artifact-root", str(self.workdir / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        # Its first store request opens the database, which on a loaded machine took longer
                        # than the trainers' 2 s request timeout; warm it up with the client's own timeout.
                        MlflowClient(self.uri).search_experiments()
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not come up within 120 s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def trainer(data: Path, uri: str, *overrides: str, summary: Path | None = None) -> subprocess.Popen:
    outbox = (summary.parent if summary else Path(data).parent) / "outbox"
    cmd = [sys.executable, "-m", "trainer", f"data.path={data}", f"tracking.uri={uri}", f"tracking.outbox={outbox}",
           *TINY, *overrides]
    if summary:
        cmd += ["--summary", str(summary)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def single_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("two-tower")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def wait_for_metric(client: MlflowClient, job: subprocess.Popen, name: str, count: int) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        experiment = client.get_experiment_by_name("two-tower")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, name)) >= count:
            return runs[0].info.run_id
        time.sleep(0.5)
    raise AssertionError(f"{name} never had {count} points while the job ran")


@pytest.mark.slow
def test_a_tracking_outage_mid_run_loses_nothing(tiny_data, tmp_path):
    """Training logs over HTTP to a real server, which is SIGKILLed mid-run and back 10 s later: every step's
    metrics, the params and the artifacts arrive anyway."""
    server = Server(tmp_path)
    client = MlflowClient(server.uri)
    job = trainer(tiny_data, server.uri, "train.epochs=3", "train.log_every=1", "tracking.request_timeout_s=2",
                  "eval.popularity_baseline=false", summary=tmp_path / "s.json")
    try:
        run_id = wait_for_metric(client, job, "train/loss", 3)
        server.stop(signal.SIGKILL)
        time.sleep(10)
        assert job.poll() is None, "training was still running while the server was down"
        server.start()
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out
        assert "is incomplete" not in out and not (tmp_path / "outbox").exists(), "everything was sent"
        steps = json.loads((tmp_path / "s.json").read_text())["steps"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, steps + 1))
        assert len(client.get_metric_history(run_id, "valid/ndcg_at_10")) == 3
        assert run.data.params["loss.logq"] == "True" and run.data.params["env.world_size"] == "1"
        summary = json.loads((tmp_path / "s.json").read_text())
        assert run.data.metrics["best/test_hr_at_10"] == pytest.approx(summary["test"]["hr@10"])
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "sharding_plan.txt", "sharding_plan.json", "eval_table.json"} <= artifacts
    finally:
        job.kill()
        server.stop()


@pytest.mark.slow
def test_a_server_gone_at_the_end_leaves_an_outbox_that_replays_into_the_run(tiny_data, tmp_path):
    """The server dies after the last validation and stays down past tracking.flush_timeout_s: the job says
    the run is incomplete and where the rest is; `python -m trainer.tracking replay` completes the run."""
    server = Server(tmp_path)
    client = MlflowClient(server.uri)
    job = trainer(tiny_data, server.uri, "train.epochs=2", "tracking.request_timeout_s=5",
                  "tracking.flush_timeout_s=5", "export.enabled=true", f"export.dir={tmp_path / 'exports'}",
                  summary=tmp_path / "s.json")
    lines = []
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith("epoch 1 step"):
                server.stop(signal.SIGKILL)
                break
        lines += job.stdout.readlines()
        job.wait(timeout=600)
        out = "".join(lines)
        assert job.returncode == 0, out
        outbox = next((tmp_path / "outbox").glob("*.jsonl"))
        assert f"warning: the MLflow run {outbox.stem}" in out and "is incomplete" in out
        assert f"python -m trainer.tracking replay {outbox}" in out
        server.start()
        assert client.get_run(outbox.stem).info.status == "RUNNING", "the final status was not sent yet"
        replayed = subprocess.run([sys.executable, "-m", "trainer.tracking", "replay", str(outbox)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
        assert replayed.returncode == 0, replayed.stderr
        assert not outbox.exists() and not (tmp_path / "outbox").exists()
        run = client.get_run(outbox.stem)
        summary = json.loads((tmp_path / "s.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.metrics["best/test_hr_at_10"] == pytest.approx(summary["test"]["hr@10"])
        assert len(client.get_metric_history(outbox.stem, "valid/ndcg_at_10")) == 2
        artifacts = {a.path for a in client.list_artifacts(outbox.stem)}
        assert {"eval_table.json", "export", "plots"} <= artifacts
        plots = {Path(a.path).name for a in client.list_artifacts(outbox.stem, "plots")}
        assert "popularity_bias.png" in plots
    finally:
        job.kill()
        server.stop()


def test_unreachable_server_at_start_is_a_clear_error(tiny_data, tmp_path):
    port = free_port()
    job = trainer(tiny_data, f"http://127.0.0.1:{port}", "tracking.request_timeout_s=2",
                  summary=tmp_path / "s.json")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 2, out
    assert f"MLflow tracking at http://127.0.0.1:{port} is unreachable" in out and "tracking.enabled=false" in out


@pytest.mark.slow
def test_demo_run_has_params_metric_series_and_artifacts(tmp_path):
    """The commands `make demo` runs, in a scratch directory, read back through MlflowClient. Two of the demo's
    four epochs: what is logged does not depend on how many there are, and training is most of this test's time
    (the suite's longest)."""
    data = tmp_path / "prepared" / "synthetic"
    prepared = subprocess.run([sys.executable, "-m", "data.prepare", "synthetic", "--out", str(data)], cwd=ROOT,
                              check=True, capture_output=True, text=True)
    assert "repeats: 0.0% of validation targets (0 of 5767)" in prepared.stdout, "the demo data has no repeats"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run([sys.executable, "-m", "trainer", "--config", "configs/synthetic.yaml",
                             f"data.path={data}", f"tracking.uri={uri}", f"export.dir={tmp_path / 'exports'}",
                             "train.epochs=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mlflow ui --backend-store-uri" in result.stdout
    assert "evaluation: leave_one_out split, full catalogue of 2996 items, seen items filtered" in result.stdout
    client = MlflowClient(uri)
    run = single_run(client)
    assert run.data.params["data.path"] == str(data) and "env.git_commit" in run.data.params
    series = [name for name in run.data.metrics
              if len(client.get_metric_history(run.info.run_id, name)) >= 3]
    assert len(series) >= 3, series
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "sharding_plan.txt", "sharding_plan.json", "eval_table.json", "export"} <= artifacts
    exported = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export.json", "query_tower.pt", "items.parquet", "items.faiss", "id_maps"} <= exported
    assert run.data.metrics["export/index_recall_at_10"] >= 0.95
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"metric_at_k.png", "item_embeddings.png", "popularity_bias.png"}
    png = Path(client.download_artifacts(run.info.run_id, "plots/popularity_bias.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_table.json", str(tmp_path))).read_text())
    table = [dict(zip(stored["columns"], row)) for row in stored["data"]]  # MLflow's table format
    model = {r["metric"]: r["value"] for r in table if r["split"] == "test" and r["scorer"] == "two_tower"}
    popularity = {r["metric"]: r["value"] for r in table if r["split"] == "test" and r["scorer"] == "popularity"}
    assert model["hr@10"] > 2 * popularity["hr@10"], "the synthetic default is clearly beatable"
    # The recommend CLI reads the export back from the run, by its id.
    history = ["3", "17", "42"]
    ranked = subprocess.run([sys.executable, "-m", "trainer.recommend", "--run", run.info.run_id, "--tracking-uri", uri,
                             "--history", ",".join(history), "-k", "20", "--mmr", "0.3", "--json"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert ranked.returncode == 0, ranked.stderr
    items = json.loads(ranked.stdout)
    assert len(items) == 20 and all(r["title"].startswith("Item ") for r in items)
    assert not set(history) & {r["raw_id"] for r in items}


def test_a_backlog_of_metrics_goes_in_few_calls_and_in_order():
    records = [{"kind": "metrics", "step": s, "timestamp": 0, "metrics": {"a": 1.0, "b": 2.0}} for s in range(600)]
    records.insert(3, {"kind": "tags", "tags": {"t": "1"}})
    batches, start = [], 0
    while start < len(records):
        batches.append(leading_batch(records, start))
        start += len(batches[-1])
    assert [b for batch in batches for b in batch] == records, "every record once, in order"
    per_call = MAX_METRICS_PER_BATCH // 2
    assert [len(b) for b in batches] == [3, 1] + [per_call] * (597 // per_call) + [597 % per_call], \
        "metrics records merge up to MAX_METRICS_PER_BATCH metrics per call, never across another kind"


class SlowClient:
    """Stands in for MlflowClient: every call takes `seconds`, longer than finish waits for the worker."""

    def __init__(self, seconds: float):
        self.seconds, self.metrics, self.called = seconds, [], threading.Event()

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.called.set()
        time.sleep(self.seconds)
        self.metrics += list(metrics)

    def set_terminated(self, run_id, status, end_time):
        time.sleep(self.seconds)


def test_a_send_that_outlives_finish_is_kept_once_in_the_outbox_and_the_worker_ends_cleanly(tmp_path, monkeypatch):
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", request_timeout_s=1, flush_timeout_s=0,
                         outbox=str(tmp_path / "outbox"), system_metrics_every_s=0)
    logger = MlflowLogger(cfg)
    logger.client = SlowClient(seconds=4)  # finish waits request_timeout_s + 1 = 2 s for the worker
    with logger.lock:  # the worker takes all three at once
        for step in range(3):
            logger.log_metrics({"loss": float(step)}, step)
    assert logger.client.called.wait(timeout=30)
    outbox = logger.finish()
    assert outbox is not None, "what was in flight when finish gave up is in the outbox"
    logger.worker.join(timeout=30)
    assert not logger.worker.is_alive() and not errors, errors
    with open(outbox) as handle:
        kept = [json.loads(line) for line in handle][1:]
    assert [r["step"] for r in kept if r["kind"] == "metrics"] == [0, 1, 2] and kept[-1]["kind"] == "status"
    assert [m.step for m in logger.client.metrics] == [0, 1, 2], "the in-flight call went through as one batch"


STARTER = """
import sys, time
from pathlib import Path
from config import TrackingConfig
from trainer.tracking.mlflow_logger import MlflowLogger
workdir = Path(sys.argv[1])
(workdir / f"ready{sys.argv[2]}").touch()
while not (workdir / "go").exists():
    time.sleep(0.01)
cfg = TrackingConfig(uri=f"sqlite:///{workdir / 'mlflow.db'}", experiment="at-once", outbox=str(workdir / "outbox"),
                     system_metrics_every_s=0)
logger = MlflowLogger(cfg, run_name=f"job{sys.argv[2]}")
logger.log_metrics({"loss": 1.0}, step=0)
logger.finish()
"""


def test_jobs_started_at_once_on_a_new_sqlite_store_all_get_their_run(tmp_path):
    """Without the store lock, 3 of 4 such processes died in MLflow's schema migration ("duplicate column name",
    alembic "0 found") in each of three tries: two sweeps launched together on a fresh machine."""
    jobs = [subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), str(i)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0] * 4, "\n".join(out[-600:] for out in outputs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("at-once").experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"job{i}" for i in range(4)]
    assert all(run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.0} for run in runs)
