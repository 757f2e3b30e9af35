"""torchx for real: the component on local_cwd (1x2 and 2x1, one MLflow run each) and its
kubernetes and slurm forms through `torchx run --dryrun`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_MODEL, TINY_TOWERS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = TINY_MODEL + ["train.epochs=2", "train.log_every=5"]


def torchx(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    return subprocess.run([str(BIN / "torchx"), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=environment)


def scheduler_request(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("=== SCHEDULER REQUEST ===")[1]


def test_kubernetes_dryrun_renders_the_job():
    """No --workspace flag (.torchxconfig disables the image build), the submitter's MLflow settings on
    every pod, the rendezvous port equal to the declared container port."""
    result = torchx("run", "--dryrun", "-s", "kubernetes", "launch/components.py:train",
                    "--nnodes", "2", "--nproc_per_node", "8", "--gpu", "8", "--image", "registry/two-tower:1",
                    "--max_retries", "3", "--config", "configs/ml1m.yaml", "train.epochs=5",
                    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_EXPERIMENT_NAME": "retrieval"})
    out = scheduler_request(result)
    assert "image: registry/two-tower:1" in out and "nvidia.com/gpu: '8'" in out
    assert out.count("python -m launch.run") == 2, "one pod per node, each running torchrun"
    assert out.count("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == 2, "a fresh rendezvous store per restart round"
    assert "--nnodes 2 --nproc_per_node 8" in out and "maxRetry: 3" in out
    assert "-m trainer --config configs/ml1m.yaml train.epochs=5" in out
    assert out.count("value: http://mlflow:5000") == 2 and out.count("value: retrieval") == 2
    assert out.count(":=localhost}:29500") == 2 and out.count("containerPort: 29500") == 2
    assert "MLFLOW_TRACKING_URI is" not in result.stderr and "without --gpu" not in result.stderr, \
        "a GPU per rank and a tracking server: nothing to warn about"


def test_kubernetes_mounts_a_volume_into_every_pod():
    result = torchx("run", "--dryrun", "-s", "kubernetes", "launch/components.py:train", "--nnodes", "2",
                    "--image", "registry/two-tower:1", "--mounts", "type=volume,src=prepared-pvc,dst=/data,readonly",
                    "--data", "/data/prepared/x", "--checkpoint_dir", "s3://bucket/ckpt",
                    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    out = scheduler_request(result)
    assert out.count("claimName: prepared-pvc") == 2 and out.count("mountPath: /data") == 2, out
    assert out.count("readOnly: true") >= 2 and "data.path=/data/prepared/x" in out, "a path on the volume is data"
    elsewhere = torchx("run", "--dryrun", "-s", "kubernetes", "launch/components.py:train", "--image", "r/t:1",
                       "--mounts", "type=volume,src=prepared-pvc,dst=/data", "--data", "/datasets/x")
    assert elsewhere.returncode != 0 and "data.path=/datasets/x" in elsewhere.stderr, "not under the mount"


def test_kubernetes_needs_an_image_and_warns_about_local_tracking_and_cpu_ranks():
    missing = torchx("run", "--dryrun", "-s", "kubernetes", "launch/components.py:train", "--nnodes", "2")
    assert missing.returncode != 0
    assert "the kubernetes scheduler runs a container image: pass --image" in missing.stderr
    assert str(ROOT) not in missing.stdout, "never the local checkout as an image"
    result = torchx("run", "--dryrun", "-s", "kubernetes", "launch/components.py:train", "--nnodes", "2",
                    "--nproc_per_node", "4", "--image", "registry/two-tower:1",
                    env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    scheduler_request(result)
    assert "MLFLOW_TRACKING_URI is sqlite:///mlflow.db: on a 2-node job" in result.stderr
    assert "--nproc_per_node 4 without --gpu" in result.stderr and "pass --gpu 4" in result.stderr


def test_slurm_dryrun_renders_the_job():
    result = torchx("run", "--dryrun", "-s", "slurm", "launch/components.py:train", "--nnodes", "2",
                    "--nproc_per_node", "4", "--gpu", "4", "--max_restarts", "1", "train.epochs=5",
                    env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    out = scheduler_request(result)
    assert "#SBATCH hetjob" in out and "--gpus-per-task=4" in out
    assert "trainer-0.out" in out and "trainer-1.out" in out, "one het-job component per node"
    assert out.count("python -m launch.run") == 2
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in out and out.count("MLFLOW_TRACKING_URI=http://mlflow:5000") == 2
    assert "--nnodes 2 --nproc_per_node 4 --max_restarts 1 -m trainer --config configs/synthetic.yaml" in out


STORE = {"AWS_ENDPOINT_URL": "https://minio.internal:9000", "AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY":
         "secret", "AWS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt", "GOOGLE_CLOUD_PROJECT": "recs"}
URIS = ["--data", "s3://recs/prepared/clicks", "--checkpoint_dir", "s3://recs/ckpt/clicks", "--export_dir",
        "s3://recs/exports"]


@pytest.mark.parametrize("scheduler", ["kubernetes", "slurm"])
def test_cluster_dryruns_take_uris_and_pass_the_store_settings(scheduler, tmp_path):
    """Data, checkpoints and exports as URIs every replica reaches; the submitter's store settings (endpoint,
    credentials) on every node as its MLflow ones are; nothing that names a file of this machine."""
    image = ["--image", "registry/two-tower:1"] if scheduler == "kubernetes" else []
    result = torchx("run", "--dryrun", "-s", scheduler, "launch/components.py:train", "--nnodes", "2", *image, *URIS,
                    env=STORE)
    out = scheduler_request(result)
    assert " ".join(out.split()).count("data.path=s3://recs/prepared/clicks checkpoint.dir=s3://recs/ckpt/clicks "
                                       "export.dir=s3://recs/exports") == 2, "(YAML wraps long lines)"
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "GOOGLE_CLOUD_PROJECT"):
        assert out.count(name) == 2, name
    assert str(ROOT) not in out and str(tmp_path) not in out and "prepared/synthetic" not in out
    if scheduler == "kubernetes":
        assert "AWS_CA_BUNDLE" not in out and "not passed to the kubernetes replicas" in result.stderr
    else:  # slurm nodes share the submitter's file system: the bundle path holds there
        assert out.count("AWS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt") == 2


def test_kubernetes_refuses_local_storage_paths():
    result = torchx("run", "--dryrun", "-s", "kubernetes", "launch/components.py:train", "--image", "r/t:1",
                    "--data", "prepared/clicks", "checkpoint.dir=/mnt/ckpt")
    assert result.returncode != 0
    assert ("the kubernetes scheduler's replicas share no disk, so data, checkpoints and exports need URIs every "
            "replica reaches (s3://, gs://, hdfs://) or paths under a --mounts volume: got data.path=prepared/clicks, "
            "checkpoint.dir=/mnt/ckpt") \
        in result.stderr


def test_local_jobs_declare_the_free_port_they_use(monkeypatch, recwarn):
    """Called as `torchx run -s local_cwd` would: a free port (two local jobs never collide), declared."""
    from launch.components import train

    monkeypatch.setattr(sys, "argv", ["torchx", "run", "-s", "local_cwd", "launch/components.py:train"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/x.db")
    role = train(nnodes=2, nproc_per_node=2).roles[0]
    port = role.port_map["c10d"]
    assert port != 29500 and f"localhost}}:{port} " in role.args[1]
    assert role.env["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/x.db" and role.image == ""
    assert not recwarn.list, "one machine: a local store and CPU ranks are fine"


@pytest.mark.slow
# Both layouts for the transformer; the bag tower's launch path is the same component (one layout here).
@pytest.mark.parametrize("nnodes,nproc,tower", [(1, 2, t) for t in sorted(TINY_TOWERS)] + [(2, 1, "transformer")])
def test_local_cwd_trains_across_processes_into_one_mlflow_run(tiny_data, tmp_path, nnodes, nproc, tower):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = torchx("run", "--wait", "--log", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'torchx'}",
                    "launch/components.py:train",
                    "--nnodes", str(nnodes), "--nproc_per_node", str(nproc), "--env", f"MLFLOW_TRACKING_URI={uri}",
                    f"data.path={tiny_data}", *TINY, *TINY_TOWERS[tower], "export.enabled=true",
                    f"export.dir={tmp_path / 'exports'}", f"checkpoint.dir={tmp_path / 'ckpt'}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("two-tower").experiment_id])
    assert len(runs) == 1, "rank 0 alone owns the run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["env.world_size"] == "2"
    assert run.data.metrics["best/test_hr_at_10"] > 0
    assert len(client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")) == 2
    # Both ranks wrote the best epoch's shards under checkpoint.dir; rank 0 exported them into the run.
    assert run.data.metrics["export/index_recall_at_10"] >= 0.95
    assert (tmp_path / "exports" / run.info.run_id / "query_tower.pt").is_file()
    manifest = json.loads((tmp_path / "exports" / run.info.run_id / "export.json").read_text())
    assert manifest["query_tower"]["kind"] == tower
    assert "export" in {a.path for a in client.list_artifacts(run.info.run_id)}
