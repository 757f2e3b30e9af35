"""MLflow for real: a loopback `mlflow server`, a server that dies mid-training, and the demo's run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_MODEL
from trainer.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
TINY = TINY_MODEL



class Server:
    """`mlflow server` on a free loopback port with a sqlite backend, as a user would start it."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{workdir / 'server.db'}",
             "--default-artifact-root", str(workdir / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not come up within 120 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def trainer(data: Path, uri: str, *overrides: str, summary: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "trainer", f"data.path={data}", f"tracking.uri={uri}", *TINY, *overrides]
    if summary:
        cmd += ["--summary", str(summary)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def single_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("two-tower")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_training_logs_to_a_real_server_over_http(tiny_data, tmp_path):
    server = Server(tmp_path)
    try:
        job = trainer(tiny_data, server.uri, "train.epochs=2", "train.log_every=2", summary=tmp_path / "s.json")
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out
        client = MlflowClient(server.uri)
        run = single_run(client)
        assert run.info.status == "FINISHED"
        assert run.data.params["loss.logq"] == "True" and run.data.params["env.world_size"] == "1"
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert len(history) >= 5 and sorted(m.step for m in history) == [m.step for m in history]
        assert len(client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")) == 2
        summary = json.loads((tmp_path / "s.json").read_text())
        assert run.data.metrics["test/hr_at_10"] == pytest.approx(summary["test"]["hr@10"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "sharding_plan.txt", "sharding_plan.json", "eval_table.json"} <= artifacts
    finally:
        server.stop()


@pytest.mark.slow
def test_training_finishes_when_the_server_dies_mid_run(tiny_data, tmp_path):
    server = Server(tmp_path)
    client = MlflowClient(server.uri)
    job = trainer(tiny_data, server.uri, "train.epochs=3", "train.log_every=1", "tracking.request_timeout_s=2")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            experiment = client.get_experiment_by_name("two-tower")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 3:
                break
            time.sleep(0.5)
        assert job.poll() is None, "training was still running when the server was stopped"
        server.stop()
        started = time.monotonic()
        out, _ = job.communicate(timeout=600)
        assert job.returncode == 0, out
        assert "test: " in out
        assert time.monotonic() - started < 240, "a dead server must not stall training for long"
    finally:
        job.kill()
        server.stop()


def test_unreachable_server_at_start_is_a_clear_error(tiny_data):
    port = free_port()
    job = trainer(tiny_data, f"http://127.0.0.1:{port}", "tracking.request_timeout_s=2")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 2, out
    assert f"MLflow tracking at http://127.0.0.1:{port} is unreachable" in out and "tracking.enabled=false" in out


@pytest.mark.slow
def test_demo_run_has_params_metric_series_and_artifacts(tmp_path):
    """The commands `make demo` runs, in a scratch directory, read back through MlflowClient."""
    data = tmp_path / "prepared" / "synthetic"
    prepared = subprocess.run([sys.executable, "-m", "data.prepare", "synthetic", "--out", str(data)], cwd=ROOT,
                              check=True, capture_output=True, text=True)
    assert "repeats: 0.0% of validation targets (0 of 5767)" in prepared.stdout, "the demo data has no repeats"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run([sys.executable, "-m", "trainer", "--config", "configs/synthetic.yaml",
                             f"data.path={data}", f"tracking.uri={uri}", f"export.dir={tmp_path / 'exports'}"],
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
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_table.json", str(tmp_path))).read_text())
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
