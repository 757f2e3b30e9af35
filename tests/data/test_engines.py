"""The embedded engine and Spark run one plan: on the same input they write the same prepared dataset, for every
source kind, features and frequency counts included, and fail on bad input with the same one-line error.

Spark runs in local mode with a real JVM (one session for the module); the tests skip only without `java`.
"""

from __future__ import annotations

import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import schema
from data.errors import DataError
from data.prepare import make_engine, prepare
from data.prepare.cli import load_source, parse_args
from data.splits import SplitConfig
from storage import location


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("Spark needs a JVM: no `java` on PATH")
    engine = make_engine("spark", master="local[2]")
    yield engine
    engine.close()


def split_config(args) -> SplitConfig:
    return SplitConfig(protocol=args.protocol, max_history=args.max_history, min_user_events=args.min_user_events,
                       min_item_events=args.min_item_events, min_positive_rating=args.min_positive_rating,
                       min_relevant_rating=args.min_relevant_rating, valid_fraction=args.valid_fraction,
                       test_fraction=args.test_fraction, keep_cold_users=args.keep_cold_users,
                       keep_cold_items=args.keep_cold_items)


def prepared_with(engine, argv: list[str], out) -> schema.Metadata:
    args = parse_args(argv + ["--out", str(out)])
    return prepare(load_source(args), split_config(args), out, seed=args.seed, engine=engine,
                   info={"kind": args.source}, warn=lambda text: None)


def sorted_rows(where) -> list:
    table = location(where).read_parquet()
    return sorted(table.to_pylist(), key=lambda row: json.dumps(row, sort_keys=True))


def assert_same_dataset(a, b, ignore: tuple[str, ...] = ()) -> None:
    """Every Parquet file of one is in the other with the same rows (compared after sorting), and the metadata
    is the same (counts, feature specs, repeats, the parts of every split) but for the `ignore`d source keys."""
    a, b = location(a), location(b)
    files_a = {n for n in a.files() if n.endswith(".parquet")}
    assert files_a == {n for n in b.files() if n.endswith(".parquet")}
    for name in sorted(files_a):
        assert sorted_rows(a / name) == sorted_rows(b / name), name
    meta_a, meta_b = (json.loads((d / schema.METADATA_FILE).read_text()) for d in (a, b))
    for meta in (meta_a, meta_b):
        meta["source"] = {k: v for k, v in meta["source"].items() if k not in ignore}
    assert meta_a == meta_b


def movielens(tmp_path) -> list[str]:
    """A MovieLens 1M layout with ratings to filter on, a duplicate line, and users and movies to join."""
    directory = tmp_path / "ml"
    directory.mkdir()
    rng = np.random.default_rng(0)
    lines = [f"{u}::{int(rng.integers(1, 40))}::{int(rng.integers(1, 6))}::{978300000 + 97 * k + u}"
             for u in range(1, 31) for k in range(int(rng.integers(4, 15)))]
    (directory / "ratings.dat").write_text("\n".join(lines + lines[:3]) + "\n")
    genres = ["Comedy", "Drama|Romance", "Action|Sci-Fi|Thriller", "(no genres listed)"]
    (directory / "movies.dat").write_text("".join(f"{i}::Movie {i} ({1950 + 2 * i})::{genres[i % 4]}\n"
                                                  for i in range(1, 38)))
    (directory / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::{[1, 18, 25][u % 3]}::{u % 7}::{10000 + u}\n"
                                                 for u in range(1, 29)))
    return ["movielens", str(directory), "--min-user-events", "4", "--min-relevant-rating", "3"]


def interactions(tmp_path) -> list[str]:
    """A CSV with text ids, feature tables with list and scalar columns, on the time protocol."""
    rng = np.random.default_rng(1)
    rows = [(f"u{u}", f"i{int(rng.integers(0, 30))}", 1000 * k + 7 * u + int(rng.integers(0, 5)),
             float(rng.integers(1, 6))) for u in range(40) for k in range(int(rng.integers(3, 12)))]
    events = tmp_path / "events.csv"
    events.write_text("uid,iid,when,stars\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in rows))
    pq.write_table(pa.table({"iid": [f"i{i}" for i in range(30)], "title": [f"Title {i}" for i in range(30)],
                             "tags": [[f"t{i % 4}", f"t{i % 5}"] if i % 3 else [] for i in range(30)],
                             "brand": [f"b{i % 3}" for i in range(30)]}), tmp_path / "items.parquet")
    (tmp_path / "users.csv").write_text("uid,country,langs\n" + "".join(f"u{u},c{u % 3},{'en|fr' if u % 2 else 'de'}\n"
                                                                      for u in range(35)))
    return ["interactions", str(events), "--user-col", "uid", "--item-col", "iid", "--time-col", "when",
            "--rating-col", "stars", "--item-features", str(tmp_path / "items.parquet"), "--user-features",
            str(tmp_path / "users.csv"), "--protocol", "time", "--min-user-events", "2", "--keep-cold-users",
            "--min-positive-rating", "2"]


def parquet_parts(tmp_path) -> list[str]:
    """A directory of Parquet parts (Spark's layout: a _SUCCESS marker, part files) with integer ids, repeated
    events and both minimums."""
    directory = tmp_path / "parts"
    directory.mkdir()
    rng = np.random.default_rng(2)
    for part in range(3):
        n = 300
        pq.write_table(pa.table({"user": rng.integers(0, 40, n), "item": rng.integers(0, 25, n),
                                 "ts": rng.integers(0, 50, n)}), directory / f"part-{part:05d}.snappy.parquet",
                       row_group_size=64)
    (directory / "_SUCCESS").write_text("")
    return ["interactions", str(directory), "--time-col", "ts", "--min-user-events", "6", "--min-item-events", "8",
            "--max-history", "5"]


def sequences(tmp_path) -> list[str]:
    path = tmp_path / "seq.txt.gz"
    rng = np.random.default_rng(3)
    with gzip.open(path, "wt") as handle:
        for user in range(30):
            handle.write(f"{user:03d} " + " ".join(str(int(i)) for i in rng.integers(0, 20, rng.integers(3, 9))) + "\n")
    (tmp_path / "attrs.json").write_text(json.dumps({str(i): [f"a{i % 3}", f"b{i % 2}"] for i in range(0, 20, 2)}))
    return ["sequences", str(path), "--item-attributes", str(tmp_path / "attrs.json"), "--min-user-events", "3"]


def synthetic(tmp_path) -> list[str]:
    return ["synthetic", "--users", "120", "--items", "60", "--mean-events", "9", "--seed", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("source", [movielens, interactions, parquet_parts, sequences, synthetic],
                         ids=lambda f: f.__name__)
def test_both_engines_write_the_same_dataset(spark, tmp_path, source):
    argv = source(tmp_path)
    embedded = make_engine("duckdb")
    try:
        meta = prepared_with(embedded, argv, location(tmp_path / "duckdb"))
    finally:
        embedded.close()
    assert prepared_with(spark, argv, location(tmp_path / "spark")) == meta
    assert_same_dataset(tmp_path / "duckdb", tmp_path / "spark")
    assert meta.counts["train_examples"] > 0 and meta.item_features or source is parquet_parts


@pytest.mark.slow
def test_both_engines_name_a_bad_value_in_one_line(spark, tmp_path):
    directory = tmp_path / "parts"
    directory.mkdir()
    good = {"user": [1, 1, 1, 2, 2, 2], "item": [1, 2, 3, 1, 2, 3], "ts": [1, 2, 3, 1, 2, 3]}
    pq.write_table(pa.table(good), directory / "part-0.parquet")
    pq.write_table(pa.table({**good, "item": [1, 2, -12, 1, 2, 3]}), directory / "part-1.parquet")
    messages = []
    for engine in (make_engine("duckdb"), spark):
        with pytest.raises(DataError) as err:
            prepared_with(engine, ["interactions", str(directory), "--time-col", "ts", "--min-user-events", "3"],
                          location(tmp_path / engine.dialect.name))
        messages.append(str(err.value))
        assert not (tmp_path / engine.dialect.name).exists(), "nothing partial"
    assert messages[0] == messages[1] == (f"{directory / 'part-1.parquet'}: column 'item': expected non-negative "
                                          f"ids; found -12 on row 3")


@pytest.mark.slow
def test_the_comparison_catches_a_spark_port_that_orders_lists_backwards(spark, tmp_path, monkeypatch):
    """The equality above can fail: a Spark spelling of the ordered list aggregate that sorts descending (a
    plausible slip) writes other multi-valued features, and the comparison names the file."""
    from data.prepare.dialect import Dialect

    argv = synthetic(tmp_path)
    embedded = make_engine("duckdb")
    try:
        prepared_with(embedded, argv, location(tmp_path / "duckdb"))
    finally:
        embedded.close()
    ordered_list = Dialect.ordered_list
    monkeypatch.setattr(Dialect, "ordered_list", lambda self, value, key: (
        f"reverse({ordered_list(self, value, key)})" if self.spark else ordered_list(self, value, key)))
    prepared_with(spark, argv, location(tmp_path / "spark"))
    with pytest.raises(AssertionError, match="items.parquet"):
        assert_same_dataset(tmp_path / "duckdb", tmp_path / "spark")
