"""Export round trip, ANN recall against exact search, MMR, the recommend CLI, and the plots that
read the export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import towers
from config import ExportConfig, dump, load_config
from data.schema import HISTORY_TIMES, TIMESTAMP, Metadata
from serving import index as ann
from serving.format import ExportError
from serving.model import ExportedModel
from serving.pyfunc import EXPORT_ARTIFACT_KEY, Recommendations
from serving.recommend import main as recommend_main
from serving.recommend import mmr
from serving.runs import LOCAL_EXPORTS
from tests.conftest import ROOT, TINY_TOWERS, dataset_dir, recommend_from_raw_ids, tiny_config, tower_overrides
from trainer import distributed
from trainer.checkpointing import checkpoint
from trainer.export.artifact import export
from trainer.loop import build, train
from trainer.tracking.plots import embedding_map, figure_rgba, item_labels, recommendation_counts


def recommend(*args: str, module: str = "serving.recommend") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def in_process(capsys, *args: str) -> SimpleNamespace:
    """`recommend` run by its `main` in this process: the same exit code, stdout and stderr."""
    code = recommend_main(list(args))
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def tower_queries(model: ExportedModel, batch) -> np.ndarray:
    """The exported tower's queries of a loader's evaluation batch, as its tower builds them from the batch."""
    with torch.no_grad():
        return towers.get(model.manifest.query_tower.kind).encode_queries(model.tower, batch).numpy()


BOTH_TOWERS = pytest.mark.parametrize("exported", sorted(TINY_TOWERS), indirect=True)
# The short-history recipe's transformer: candidates tied to the item table, their item features projected in.
TIED = {"model.tower.candidate": "tied", "model.tower.input_norm": "true", "model.hidden_dims": "[]",
        "model.output_dim": "16"}


@pytest.fixture(scope="module")
def exported(request, tiny_data, tmp_path_factory):
    """A dev-mode model trained for a few steps, its model snapshot, and the export written from it: the bag
    tower's, or with `BOTH_TOWERS` each tower's."""
    variant = getattr(request, "param", "bags")
    tower, tied = variant.removesuffix("-tied"), variant.endswith("-tied")
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(tiny_data, **tower_overrides(tower), **(TIED if tied else {}))
    job = build(cfg, distributed.init("cpu"))
    batches = iter(job.data.train_loader.epoch(0))
    for _ in range(8):
        job.model.pipeline.progress(batches)
    checkpoint.save_model(job.model.dmp, tmp / "best", {"epoch": 0, "step": 8}, dump(cfg))
    job.model.pipeline.detach()
    job.model.dmp.eval()  # as the trainer evaluates: the transformer's dropout off
    batch = next(iter(job.data.eval_loaders["valid"].epoch(0)))
    scores = job.model.scorer(job.data, torch.device("cpu"))(batch)
    manifest = export(tmp / "best", tmp / "out")
    return SimpleNamespace(dir=tmp / "out", manifest=manifest, batch=batch, scores=scores, data=tiny_data,
                           checkpoint=tmp / "best", tower=tower)


@pytest.mark.parametrize("exported", sorted(TINY_TOWERS) + ["transformer-tied"], indirect=True)
def test_exported_towers_score_like_the_training_model(exported):
    model = ExportedModel(exported.dir)
    assert model.manifest.query_tower.kind == exported.tower
    query = tower_queries(model, exported.batch)
    torch.testing.assert_close(torch.from_numpy(query @ model.embeddings.T),
                               exported.scores[:, torch.from_numpy(model.item_ids)], rtol=1e-5, atol=1e-5)
    assert exported.manifest.index["recall@10"] >= 0.95


def test_export_cli_reads_the_checkpoints_config_and_names_a_bad_path(exported, tmp_path):
    out = tmp_path / "flat"
    result = subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", str(exported.checkpoint),
                             "--out", str(out), "export.index=flat", "export.recall_queries=100"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "flat index recall@10 against exact search 1.0000" in result.stdout
    info = json.loads((out / "export.json").read_text())
    assert info["index"]["kind"] == "flat" and info["index"]["recall_queries"] == 100
    assert info["source"]["state"] == {"epoch": 0, "step": 8}
    bad = subprocess.run([sys.executable, "-m", "trainer.export", "--checkpoint", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "x")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and f"{tmp_path / 'nope'}: expected a complete checkpoint directory" in bad.stderr
    assert "found nothing there" in bad.stderr
    assert not (tmp_path / "x").exists()


@BOTH_TOWERS
def test_a_query_built_from_raw_inputs_matches_the_loaders(exported):
    """What the recommend CLI builds from a history and feature values is what training fed the tower: raw ids
    in, the training model's scores out."""
    model = ExportedModel(exported.dir)
    by_user = {row["user"]: row for row in pq.read_table(exported.data / "valid").to_pylist()}
    rows = [by_user[int(user)] for user in exported.batch.users[:40]]  # a sequence tower's come by length
    expected = tower_queries(model, exported.batch)[:40]
    assert model.reads_times == (exported.tower == "hstu"), "HSTU reads the tiny data's event times"
    for row, want in zip(rows, expected):
        features = {name: row[name] if multi else [row[name]] for name, multi in model.features.items()}
        times = row[HISTORY_TIMES] + [row[TIMESTAMP]] if model.reads_times else None
        np.testing.assert_allclose(model.encode(row["history"], features, times=times), want, rtol=1e-5, atol=1e-6)
    for position, row in enumerate(rows[:10]):
        items, scores = recommend_from_raw_ids(model, row)
        torch.testing.assert_close(torch.tensor(scores), exported.scores[position, items], rtol=1e-5, atol=1e-5)


LOADED_TORCHREC = ("import sys; print('LOADED', sorted(m for m in sys.modules "
                   "if m.split('.')[0] in ('torchrec', 'fbgemm_gpu')))")


def fresh_interpreter(code: str) -> subprocess.CompletedProcess:
    """Runs `code`, then prints which TorchRec/FBGEMM modules it loaded, in a new Python process."""
    return subprocess.run([sys.executable, "-c", f"{code}\n{LOADED_TORCHREC}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def cli(module: str, *args: str) -> str:
    """Python that runs `python -m module args` in-process, keeping the interpreter alive afterwards."""
    return (f"import runpy, sys; sys.argv = {[module, *args]!r}\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            f"    assert not e.code, e.code")


@BOTH_TOWERS
def test_every_serving_entry_point_runs_without_torchrec(exported, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serving", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(exported.dir), "export")
    model = ExportedModel(exported.dir)
    item = model.raw_ids[0]
    timed = ["--times", "1700000000"] if model.reads_times else []
    entry_points = {
        "ExportedModel": "from serving.model import ExportedModel\n"
                         f"m = ExportedModel({str(exported.dir)!r})\n"
                         "times = [1, 2, 3, 4] if m.reads_times else None\n"
                         "assert m.encode([1, 2, 3], {}, times=times).shape == (m.manifest.dim,)",
        "recommend --history": cli("serving.recommend", "--run", str(exported.dir), "--history", item, *timed,
                                   "-k", "3"),
        "recommend --similar": cli("serving.recommend", "--run", str(exported.dir), "--similar", item, "-k", "3"),
        "recommend --run <MLflow run id>": cli("serving.recommend", "--run", run, "--tracking-uri", uri,
                                               "--history", item, *timed, "-k", "3"),
        "trainer.recommend (the old command)": cli("trainer.recommend", "--run", str(exported.dir), "--history",
                                                   item, *timed, "-k", "3"),
    }
    # One interpreter runs them all, in turn: whichever imported TorchRec, it is still loaded at the end.
    result = fresh_interpreter("\n".join(f"print({name!r}, flush=True)\n{code}" for name, code in entry_points.items()))
    assert result.returncode == 0, (result.stdout.splitlines()[-3:], result.stderr[-2000:])
    assert result.stdout.strip().splitlines()[-1] == "LOADED []", result.stdout[-500:]
    assert fresh_interpreter("import trainer.loop").stdout.strip() != "LOADED []", "the check can see TorchRec"


@pytest.mark.parametrize("exported", ["hstu"], indirect=True)
def test_a_model_that_reads_event_times_needs_them_and_scores_by_them(exported, capsys):
    """HSTU on data with timestamps: recommend refuses a history without its times (one line, exit 2), counts them,
    and its answer moves with the query's time, while the bag tower only notes that it ignores them."""
    model = ExportedModel(exported.dir)
    history = ",".join(model.raw_ids[:3])
    run = ("--run", str(exported.dir), "--history", history, "--json", "-k", "5")
    missing = in_process(capsys, *run)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "error: --times: this model reads event times" in missing.stderr
    short = in_process(capsys, *run, "--times", "1700000000,1700000600")
    assert short.returncode == 2 and "--times: one per --history id (3), got 2" in short.stderr
    word = in_process(capsys, *run, "--times", "1700000000,soon,1700000900")
    assert word.returncode == 2 and "--times: unix times in whole seconds, got 'soon'" in word.stderr
    times = ("--times", "1700000000,1700000600,1700000900")
    soon, later = (in_process(capsys, *run, *times, "--at", at) for at in ("1700001000", "1760000000"))
    assert soon.returncode == later.returncode == 0, (soon.stderr, later.stderr)
    assert json.loads(soon.stdout) != json.loads(later.stdout), "the query's time is read"
    again = in_process(capsys, *run, *times, "--at", "1700001000")
    assert json.loads(again.stdout) == json.loads(soon.stdout)
    first, second, third = model.raw_ids[:3]
    skipped = in_process(capsys, "--run", str(exported.dir), "--history", f"{first},no-such-item,{second},{third}",
                         "--times", "1700000000,1700000300,1700000600,1700000900", "--at", "1700001000", "--json",
                         "-k", "5")
    assert "unknown item ids, skipped: no-such-item" in skipped.stderr
    assert json.loads(skipped.stdout) == json.loads(soon.stdout), "an unknown id's time goes with it"
    cold = in_process(capsys, "--run", str(exported.dir), "--history", "", "--times", "", "-k", "3", "--json")
    assert cold.returncode == 0 and len(json.loads(cold.stdout)) == 3, "a cold start needs only the query's time"
    pyfunc = Recommendations()
    pyfunc.load_context(SimpleNamespace(artifacts={EXPORT_ARTIFACT_KEY: str(exported.dir)}))
    rows = pd.DataFrame({"history": [model.raw_ids[:3]] * 2, "times": [[1700000000, 1700000600, 1700000900]] * 2,
                         "at": [1700001000, 1760000000]})
    answers = pyfunc.predict(None, rows, {"k": 5})
    assert [list(items) for items in answers["items"]] == [[r["raw_id"] for r in json.loads(out.stdout)]
                                                           for out in (soon, later)], "pyfunc reads times like the CLI"


def test_recommend_skips_unknown_and_seen_ids(exported, tmp_path, capsys, monkeypatch):
    """The CLI as a subprocess once; its other answers in process (the same `main`, without an interpreter's
    start-up each)."""
    model = ExportedModel(exported.dir)
    history = model.raw_ids[:5]
    result = recommend("--run", str(exported.dir), "--history", ",".join([history[0], "no-such-item", *history[1:]]),
                       "-k", "12", "--json")
    assert result.returncode == 0, result.stderr
    assert "unknown item ids, skipped: no-such-item" in result.stderr
    ranked = json.loads(result.stdout)
    assert len(ranked) == 12 and not {r["raw_id"] for r in ranked} & set(history)
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True) and all(r["title"] for r in ranked)

    similar = in_process(capsys, "--run", str(exported.dir), "--similar", history[0], "-k", "5", "--json")
    assert similar.returncode == 0 and len(json.loads(similar.stdout)) == 5
    assert history[0] not in {r["raw_id"] for r in json.loads(similar.stdout)}
    no_user_table = in_process(capsys, "--run", str(exported.dir), "--history", history[0], "--user", "3")
    assert no_user_table.returncode == 0 and "--user ignored: this model has no user-id table" in no_user_table.stderr
    timed = in_process(capsys, "--run", str(exported.dir), "--history", history[0], "--times", "1700000000")
    assert timed.returncode == 0 and "--times ignored: this model reads no event times" in timed.stderr
    unknown = in_process(capsys, "--run", str(exported.dir), "--similar", "no-such-item")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert f"error: --similar: item id 'no-such-item' is not in the catalogue ({len(model.raw_ids)} items, e.g. " \
        in unknown.stderr
    only_unknown = in_process(capsys, "--run", str(exported.dir), "--history", "no-such-item,nor-this")
    assert only_unknown.returncode == 2 and only_unknown.stdout == ""
    assert "error: --history: none of its item ids is in the catalogue: no-such-item, nor-this" in only_unknown.stderr
    cold = in_process(capsys, "--run", str(exported.dir), "--history", "", "-k", "3", "--json")
    assert cold.returncode == 0 and len(json.loads(cold.stdout)) == 3, "an empty history is a cold start"
    bad = in_process(capsys, "--run", str(exported.dir), "--history", history[0], "--user-features", "u_shoe_size=44")
    assert bad.returncode == 2 and "no feature u_shoe_size" in bad.stderr and "u_gender" in bad.stderr
    missing = in_process(capsys, "--run", str(exported.dir / "nowhere"), "--history", history[0])
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "neither an export directory" in missing.stderr
    store = tmp_path / "none.db"
    no_store = in_process(capsys, "--run", "0123456789abcdef0123456789abcdef", "--tracking-uri", f"sqlite:///{store}",
                         "--history", history[0])
    assert no_store.returncode == 2 and f"no MLflow store at sqlite:///{store}" in no_store.stderr
    assert not store.exists(), "looking a run up never creates an empty MLflow store"
    run_id = "0123456789abcdef0123456789abcdef"
    shutil.copytree(exported.dir, tmp_path / LOCAL_EXPORTS / run_id)
    monkeypatch.chdir(tmp_path)
    local = in_process(capsys, "--run", run_id, "--tracking-uri", f"sqlite:///{store}", "--history", history[0])
    assert local.returncode == 0 and local.stdout, "a run id whose export is under exports/ reads it, no MLflow"
    assert ExportConfig().dir == LOCAL_EXPORTS
    broken = tmp_path / "broken"
    shutil.copytree(exported.dir, broken)
    (broken / "items.faiss").unlink()
    incomplete = in_process(capsys, "--run", str(broken), "--history", history[0])
    assert incomplete.returncode == 2
    assert f"{broken}: not a complete export: items.faiss is missing" in incomplete.stderr


@pytest.mark.parametrize("damage", ["junk in the index", "a truncated tower"])
def test_a_damaged_export_is_named_and_never_parsed(exported, tmp_path, damage):
    """Export verification: every file is checked against the size and SHA-256 its manifest recorded before it is
    parsed, so damage is one line naming the file, not a faiss or torch traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(exported.dir, broken)
    if damage == "junk in the index":
        data = bytearray((broken / "items.faiss").read_bytes())
        data[:4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        (broken / "items.faiss").write_bytes(bytes(data))
        expected = f"{broken / 'items.faiss'}: does not match the SHA-256 recorded when it was exported"
    else:
        tower = broken / "query_tower.pt"
        tower.write_bytes(tower.read_bytes()[:1000])
        expected = f"{broken}: not a complete export: query_tower.pt has 1000 bytes, but"
    with pytest.raises(ExportError) as err:
        ExportedModel(broken)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_mmr_moves_a_near_duplicate_below_a_diverse_item():
    vectors = np.array([[1.0, 0.0, 0.0], [0.995, 0.0998, 0.0], [0.0, 0.0, 1.0]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    relevance = np.array([0.90, 0.89, 0.60])
    assert mmr(relevance, vectors, 3, 0.0).tolist() == [0, 1, 2], "no diversity: the plain ranking"
    assert mmr(relevance, vectors, 3, 0.3).tolist() == [0, 2, 1], "the near duplicate of the top item drops"
    assert mmr(relevance, vectors, 2, 0.3).tolist() == [0, 2]


def test_hnsw_with_default_settings_recalls_the_exact_top10():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(200, 64))
    vectors = centres[rng.integers(0, 200, 30_000)] + 0.6 * rng.normal(size=(30_000, 64))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = centres[rng.integers(0, 200, 500)] + 0.6 * rng.normal(size=(500, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(1, 30_001)
    _, exact = ann.exact_search(vectors, ids, queries, 10)
    brute = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]]
    assert ann.recall_at_k(exact, brute) == 1.0
    _, chunked = ann.exact_search(vectors, ids, queries, 10, max_scores=70_000)  # 2 queries per chunk
    assert (chunked == exact).all()
    d = ExportConfig()
    _, approx = ann.search(ann.build(vectors, ids, "hnsw", d.hnsw_m, d.hnsw_ef_construction, d.hnsw_ef_search),
                           queries, 10)
    recall = ann.recall_at_k(approx, exact)
    assert recall >= 0.95, recall
    _, flat = ann.search(ann.build(vectors, ids, "flat"), queries, 10)
    assert ann.recall_at_k(flat, exact) == 1.0


@pytest.mark.slow
def test_ml1m_export_recall_and_recommendations_with_titles(tmp_path):
    raw = dataset_dir("ml-1m")
    data = tmp_path / "ml-1m"
    subprocess.run([sys.executable, "-m", "data.prepare", "movielens", str(raw), "--out", str(data),
                    "--max-history", "30"], cwd=ROOT, check=True, capture_output=True)  # the longest bag: last 30
    cfg = load_config(ROOT / "configs" / "ml1m.yaml", [f"data.path={data}", "train.epochs=1", "train.max_steps=150",
                                                       "tracking.enabled=false", "eval.popularity_baseline=false",
                                                       f"export.dir={tmp_path / 'exports'}"])
    summary = train(cfg)
    assert summary["export"]["index"]["recall@10"] >= 0.95, summary["export"]
    out = Path(summary["export"]["dir"])
    # Star Wars IV, The Empire Strikes Back, Return of the Jedi, Raiders of the Lost Ark
    result = recommend("--run", str(out), "--history", "260,1196,1210,1198", "-k", "10", "--json")
    assert result.returncode == 0, result.stderr
    ranked = json.loads(result.stdout)
    assert len(ranked) == 10 and all("(19" in r["title"] or "(20" in r["title"] for r in ranked)
    assert not {"260", "1196", "1210", "1198"} & {r["raw_id"] for r in ranked}


def test_popularity_plot_counts_what_the_index_recommends_minus_seen(exported):
    model = ExportedModel(exported.dir)
    rows = np.arange(0, len(model.item_ids), 7)
    seen = [model.item_ids[[r]] for r in rows]  # each query is an item's own vector, and that item is seen
    counts = recommendation_counts(model, model.embeddings[rows], seen, 5)
    assert counts.sum() == 5 * len(rows)
    _, top = ann.exact_search(model.embeddings, model.item_ids, model.embeddings[rows[:1]], 6)
    expected = [model.row_of_id[int(i)] for i in top[0] if i != model.item_ids[rows[0]]][:5]
    single = recommendation_counts(model, model.embeddings[rows[:1]], seen[:1], 5)
    assert sorted(np.flatnonzero(single)) == sorted(expected) and single[rows[0]] == 0


def test_embedding_map_is_coloured_by_raw_genre_names(exported):
    model = ExportedModel(exported.dir)
    feature, labels = item_labels(exported.data, model.item_ids, Metadata.load(exported.data))
    genres = set(pq.read_table(exported.data / "id_maps" / "i_genre.parquet").column("raw").to_pylist())
    assert feature == "i_genre" and len(labels) == len(model.item_ids) and set(labels) <= genres
    image = figure_rgba(embedding_map(model.embeddings, labels, feature))
    assert image.ndim == 3 and image.shape[2] == 4 and image[..., :3].std() > 0, "a drawn, non-blank image"
