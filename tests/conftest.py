"""Shared fixtures: where the real datasets are, and small prepared datasets built in tmp dirs."""

from __future__ import annotations

import os
import subprocess
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data import schema
from data.ragged import list_array
from storage import location
from storage.commit import Staging, commit, writing
from tests.s3server import S3Server

ROOT = Path(__file__).resolve().parents[1]
# A model small enough for multi-process tests on 2 cores. Export is off unless a test turns it on
# (with a tmp export.dir), so tests never write into the project's exports/.
TINY_MODEL = ["loader.batch_size=64", "negatives.num_sampled=32", "model.hidden_dims=[32]", "model.output_dim=16",
              "model.item_dim=16", "model.feature_dim=8", "eval.batch_size=256", "export.enabled=false"]
# Each registered query tower (towers.TOWERS) with the overrides that select it for the tiny tests. Adding a tower
# adds its line here; every test parametrised with `tower_params` then runs for it (test_layers checks the list).
TINY_TOWERS = {"bags": [], "transformer": ["model.query_tower=transformer", "loader.max_sequence_length=20"],
               "hstu": ["model.query_tower=hstu", "loader.max_sequence_length=20"]}
DATASETS = Path(os.environ.get("TWO_TOWER_DATASETS", ROOT.parent / "shared" / "datasets"))

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
E2E = ROOT / "tests" / "e2e"


def pytest_collection_modifyitems(items: list) -> None:
    """Tests under tests/e2e/ (real processes, servers and commands) are marked `e2e`: `make test-unit` leaves
    them out; everything else sits beside the package it tests."""
    for item in items:
        if E2E in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


def repository_files() -> set[str]:
    """What git sees in the checkout, ignored files included (Python's and pytest's caches excepted)."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    return {line[3:] for line in out.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.fixture(scope="session", autouse=True)
def nothing_left_in_the_repository():
    """Every test writes under tmp: after the whole session the checkout has no new file, ignored or not
    (no mlruns/, mlflow.db, exports/, outbox or torchx logs)."""
    before = repository_files()
    yield
    left = sorted(repository_files() - before)
    assert not left, f"the tests left files in the repository: {left[:10]}"


def tower_overrides(tower: str) -> dict[str, str]:
    """TINY_TOWERS[tower] as tiny_config keyword overrides."""
    return dict(arg.split("=", 1) for arg in TINY_TOWERS[tower])


def tiny_config(path, **overrides):
    """A dev-mode JobConfig of the tiny model on `path`, untracked; overrides as section.key=value."""
    from config import load_config

    base = [f"data.path={path}", *TINY_MODEL, "tracking.enabled=false", "train.log_every=5"]
    return load_config(None, base + [f"{k}={v}" for k, v in overrides.items()])


def dataset_dir(name: str) -> Path:
    """A real dataset from ../shared/datasets (or $TWO_TOWER_DATASETS); skips when absent (licence: not shipped)."""
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{name} not found at {path}: MovieLens may not be redistributed, so it is read from "
                    f"../shared/datasets or $TWO_TOWER_DATASETS")
    return path


def write_fake_prepared(directory: Path, rng: np.random.Generator, file_sizes: list[int], row_group: int,
                        num_items: int = 50, num_users: int = 30, max_history: int = 8) -> dict:
    """A prepared dataset written by hand with awkward shapes: uneven files and row groups, empty
    histories, multi-valued features; targets are unique per example so tests can identify rows.
    Committed like prepare's output (a manifest written last), so the loader accepts it."""
    with writing(directory, schema.KIND) as staging:
        return fake_prepared_files(staging, rng, file_sizes, row_group, num_items, num_users, max_history)


def fake_prepared_files(staging, rng: np.random.Generator, file_sizes: list[int], row_group: int, num_items: int,
                        num_users: int, max_history: int) -> dict:
    total = sum(file_sizes)
    item_vocab = max(num_items, total) + 1
    targets = rng.permutation(np.arange(1, total + 1))
    names, rows = [], []
    start = 0
    for part, size in enumerate(file_sizes):
        lengths = rng.integers(0, max_history + 1, size)
        lengths[rng.random(size) < 0.2] = 0
        history = rng.integers(1, item_vocab, int(lengths.sum()))
        tag_lengths = rng.integers(0, 3, size)
        tags = rng.integers(1, 6, int(tag_lengths.sum()))
        table = pa.table({
            schema.USER: pa.array(rng.integers(1, num_users + 1, size)),
            schema.HISTORY: list_array(lengths, history),
            "u_age": pa.array(rng.integers(0, 8, size)),
            "u_tags": list_array(tag_lengths, tags),
            schema.TARGET: pa.array(targets[start:start + size]),
            schema.TIMESTAMP: pa.array(np.arange(start, start + size)),
        })
        name = f"{schema.TRAIN_DIR}/part-{part:05d}.parquet"
        staging.write_parquet(name, table, row_group_size=row_group)
        names.append(name)
        rows.extend(table.to_pylist())
        start += size
    genre_lengths = rng.integers(0, 4, item_vocab - 1)
    items = pa.table({
        schema.ITEM: pa.array(np.arange(1, item_vocab)), schema.RAW_ID: pa.array(np.arange(1, item_vocab).astype(str)),
        schema.TITLE: pa.array([""] * (item_vocab - 1)),
        schema.FREQ: pa.array(rng.integers(0, 20, item_vocab - 1)),
        "i_genre": list_array(genre_lengths, rng.integers(1, 7, int(genre_lengths.sum()))),
        "i_decade": pa.array(rng.integers(0, 5, item_vocab - 1)),
    })
    staging.write_parquet(schema.ITEMS_FILE, items)
    meta = schema.Metadata(
        schema_version=schema.SCHEMA_VERSION, source={"kind": "test"}, split={"protocol": "leave_one_out"},
        filters={}, max_history=max_history, num_users=num_users, num_items=item_vocab - 1,
        counts={"train_examples": total},
        item_features=[schema.FeatureSpec("i_decade", 5, False), schema.FeatureSpec("i_genre", 7, True)],
        user_features=[schema.FeatureSpec("u_age", 8, False), schema.FeatureSpec("u_tags", 6, True)],
        files={"train": names})
    staging.write_text(schema.METADATA_FILE, meta.to_json())
    return {"rows": rows, "items": items.to_pylist(), "meta": meta}


def recommit(directory, kind: str = "prepared dataset") -> None:
    """Rewrites a directory's manifest from its files as they are now: what a writer that produced these files, and
    committed them, leaves (for tests of the readers' own checks)."""
    where = location(directory)
    staging = Staging(where, kind, where)
    staging.record_written()
    commit(staging)


@pytest.fixture
def fake_prepared(tmp_path):
    def build(file_sizes=(37, 100, 5, 61), row_group=16, seed=0, **kwargs):
        path = tmp_path / f"fake-{seed}"
        info = write_fake_prepared(path, np.random.default_rng(seed), list(file_sizes), row_group, **kwargs)
        return path, info
    return build


def synthetic_dataset(tmp_path_factory, name: str, users: int, items: int, mean_events: float, topics: int,
                      max_history: int) -> Path:
    """A small synthetic dataset, prepared through the same code path as real data."""
    from data.prepare import prepare
    from data.splits import SplitConfig
    from data.synthetic import SyntheticConfig, generate

    path = tmp_path_factory.mktemp("data") / name
    prepare(generate(SyntheticConfig(num_users=users, num_items=items, mean_events=mean_events, num_topics=topics)),
            SplitConfig(max_history=max_history), path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """800 synthetic users (666 with at least 5 distinct items), 300 items: a few seconds per epoch."""
    return synthetic_dataset(tmp_path_factory, "tiny", 800, 300, 15, 12, 20)


def recommend_from_raw_ids(model, row: dict, k: int = 10) -> tuple[list[int], list[float]]:
    """A prepared row's history and features (and times, for a model that reads them) as a user types them into
    `recommend` (raw ids, oldest first), through the same `Recommender` the CLI runs: the dense item ids it ranks
    top, and their scores."""
    from serving.recommend import Recommender

    raw_item = dict(zip(model.item_ids.tolist(), model.raw_ids))
    features = {}
    for name, multi in model.features.items():
        raw_value = {dense: raw for raw, dense in model.id_maps[name].items()}
        features[name] = [raw_value[v] for v in (row[name] if multi else [row[name]]) if v != schema.PAD_ID]
    recommender = Recommender(model)
    times = {"times": row[schema.HISTORY_TIMES], "at": row[schema.TIMESTAMP]} if model.reads_times else {}
    ranked = recommender.recommend([raw_item[i] for i in row["history"]], features, k=k, **times)
    assert not [n for n in recommender.notes if "unknown" in n], recommender.notes
    return [int(model.item_ids[model.row_of_raw[r.raw_id]]) for r in ranked], [r.score for r in ranked]


def s3_environment(monkeypatch, endpoint: str, key: str = "testing", secret: str = "testing") -> None:
    """The standard AWS environment every S3 tool reads, pointed at a test server (inherited by subprocesses)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A fresh bucket on the session's S3 server, with the environment pointing at it: its URI, s3://<bucket>."""
    s3_environment(monkeypatch, s3_server.endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}"
