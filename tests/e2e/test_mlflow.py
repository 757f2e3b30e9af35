"""The MLflow run as its UI shows it, read back through MlflowClient: a training-mode experiment, a
named and described run with source tags, the dataset, best/* metrics first, system metrics, the
evaluation table, and a servable registered model that answers like the recommend CLI."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TINY_MODEL, repository_files
from trainer.distributed import free_port

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
HISTORY = ["3", "17", "42"]


@pytest.fixture(scope="module")
def tracked(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    before = repository_files()
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--config", "configs/synthetic.yaml", f"data.path={tiny_data}", *TINY_MODEL,
         "train.epochs=2", f"tracking.uri={uri}", "tracking.register_as=two-tower-test",
         "tracking.system_metrics_every_s=1", "export.enabled=true", f"export.dir={tmp / 'exports'}",
         f"tracking.outbox={tmp / 'outbox'}", "--summary", str(tmp / "summary.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "TORCHX_JOB_ID": "local_cwd://torchx/two-tower-abc"})
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("two-tower")
    run = client.search_runs([experiment.experiment_id])[0]
    return SimpleNamespace(uri=uri, client=client, experiment=experiment, run=run, tmp=tmp,
                           summary=json.loads((tmp / "summary.json").read_text()),
                           added=repository_files() - before)


def test_the_experiment_opens_in_training_mode(tracked):
    assert tracked.experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_run_has_a_name_a_description_and_source_tags(tracked):
    run = tracked.run
    assert run.info.run_name.startswith("synthetic-bags-") and len(run.info.run_name) == len("synthetic-bags-") + 6
    note = run.data.tags["mlflow.note.content"]
    assert str(tracked.summary["test"]["users"]).split(".")[0] in note.replace(",", "")
    assert "Result" in note and f"HR@10 {tracked.summary['test']['hr@10']:.4f}" in note
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "python -m trainer --config configs/synthetic.yaml"
    assert tags["mlflow.source.git.commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                                              capture_output=True, text=True).stdout.strip()
    assert tags["git.dirty"] in ("true", "false") and tags["mlflow.user"]
    assert tags["torchx.job_id"] == "local_cwd://torchx/two-tower-abc"
    assert tags["best_epoch"] == str(tracked.summary["best_epoch"])


def test_constants_are_params_and_the_headline_metrics_sort_first(tracked):
    run = tracked.run
    assert not [m for m in run.data.metrics if m.startswith(("train/lr", "train/temperature"))]
    assert run.data.params["optim.dense_lr"] == "0.001" and run.data.params["loss.temperature"] == "0.05"
    assert sorted(run.data.metrics)[0].startswith("best/")
    assert run.data.metrics["best/epoch"] == tracked.summary["best_epoch"]
    assert run.data.metrics["best/test_ndcg_at_10"] == pytest.approx(tracked.summary["test"]["ndcg@10"])
    assert run.data.metrics["best/valid_ndcg_at_10"] == pytest.approx(tracked.summary["valid"]["ndcg@10"])


def test_system_metrics_are_recorded(tracked):
    history = tracked.client.get_metric_history(tracked.run.info.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 * os.cpu_count() for m in history)
    assert tracked.run.data.metrics["system/system_memory_usage_megabytes"] > 0


def test_the_dataset_is_a_logged_input_with_digest_schema_and_counts(tracked, tiny_data):
    (entry,) = tracked.run.inputs.dataset_inputs
    dataset = entry.dataset
    assert dataset.source == json.dumps({"uri": str(Path(tiny_data).resolve())}) and len(dataset.digest) == 16
    columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert {"user", "history", "target"} <= columns
    meta = json.loads((Path(tiny_data) / "metadata.json").read_text())
    profile = json.loads(dataset.profile)
    assert (profile["train_examples"], profile["valid_queries"], profile["test_queries"]) == (
        meta["counts"]["train_examples"], meta["counts"]["valid_rows"], meta["counts"]["test_rows"])
    assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"


def test_the_evaluation_table_is_an_mlflow_table(tracked):
    logged = json.loads(tracked.run.data.tags["mlflow.loggedArtifacts"])
    assert {"path": "eval_table.json", "type": "table"} in logged
    mlflow.set_tracking_uri(tracked.uri)  # load_table searches runs through the global tracking URI
    table = tracked.client.load_table(tracked.experiment.experiment_id, "eval_table.json",
                                      run_ids=[tracked.run.info.run_id])
    assert {"split", "scorer", "metric", "value"} <= set(table.columns)
    row = table[(table.split == "test") & (table.scorer == "two_tower") & (table.metric == "hr@10")]
    assert row.value.item() == pytest.approx(tracked.summary["test"]["hr@10"])


def recommend_cli(uri: str, run_id: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "serving.recommend", "--run", run_id, "--tracking-uri", uri,
                             "--history", ",".join(HISTORY), "-k", "5", "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return [r["raw_id"] for r in json.loads(result.stdout)]


def test_the_registered_pyfunc_model_answers_like_recommend_without_torchrec(tracked):
    run_id = tracked.run.info.run_id
    (version,) = tracked.client.search_model_versions("name='two-tower-test'")
    assert version.run_id == run_id
    code = (f"import mlflow, pandas as pd, sys; mlflow.set_tracking_uri({tracked.uri!r})\n"
            f"model = mlflow.pyfunc.load_model('runs:/{run_id}/model')\n"
            f"out = model.predict(pd.DataFrame({{'history': [{HISTORY!r}]}}), params={{'k': 5}})\n"
            f"print(list(out['items'][0]))\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tracked.tmp, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    items, loaded = result.stdout.strip().splitlines()[-2:]
    assert eval(items) == recommend_cli(tracked.uri, run_id)
    assert loaded == "[]", "the logged model loads without TorchRec or FBGEMM"
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.inputs.input_names()[:2] == ["history", "user"]
    assert info.signature.params.params[0].name == "k"


def test_the_logged_model_pins_its_requirements_and_links_the_test_metrics(tracked):
    run_id = tracked.run.info.run_id
    mlflow.set_tracking_uri(tracked.uri)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/requirements.txt",
                                                            dst_path=str(tracked.tmp / "reqs"))).read_text()
    pinned = dict(line.split("==") for line in requirements.split() if "==" in line)
    for name in ("torch", "numpy", "pandas", "pyarrow", "faiss-cpu", "mlflow"):
        assert pinned.get(name) == importlib.metadata.version(name).split("+")[0], (name, requirements)
    linked = {m.key: m.value for m in tracked.client.get_logged_model(info.model_id).metrics}
    assert linked["best/test_ndcg_at_10"] == pytest.approx(tracked.summary["test"]["ndcg@10"])
    assert set(linked) == {f"best/test_{k.replace('@', '_at_')}" for k in tracked.summary["test"]
                           if k not in ("users", "skipped")}


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_rest_request(tracked):
    port = free_port()
    server = subprocess.Popen([MLFLOW, "models", "serve", "-m", f"runs:/{tracked.run.info.run_id}/model",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tracked.tmp, env={**os.environ, "MLFLOW_TRACKING_URI": tracked.uri,
                                                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        body = json.dumps({"dataframe_records": [{"history": HISTORY}], "params": {"k": 5}}).encode()
        deadline, answer = time.monotonic() + 180, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(1)
        assert answer is not None, "the scoring server answered"
        assert answer["predictions"][0]["items"] == recommend_cli(tracked.uri, tracked.run.info.run_id)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert server.poll() is not None, "the test shut the server down"


def test_a_tracked_run_leaves_nothing_in_the_repository(tracked):
    assert tracked.added == set(), "no mlruns/, mlflow.db, exports/ or outbox left behind"


def test_pandas_input_with_features_and_an_unknown_id(tracked):
    mlflow.set_tracking_uri(tracked.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{tracked.run.info.run_id}/model")
    out = model.predict(pd.DataFrame({"history": [HISTORY + ["no-such-item"], HISTORY[:1]],
                                      "u_gender": ["F", None]}), params={"k": 3})
    assert [len(items) for items in out["items"]] == [3, 3]
    assert not set(HISTORY) & set(out["items"][0]), "the history is never recommended"
