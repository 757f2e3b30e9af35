"""data.prepare on the real MovieLens copies and on small files of every other accepted layout."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import schema
from data.prepare.cli import main as prepare_main
from data.schema import Metadata
from tests.conftest import dataset_dir


def raw_id_of(out, name):
    table = pq.read_table(out / schema.ID_MAPS_DIR / f"{name}.parquet").to_pandas()
    return dict(zip(table["id"], table["raw"]))


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml1m") / "prepared"
    assert prepare_main(["movielens", str(dataset_dir("ml-1m")), "--out", str(out), "--max-history", "20"]) == 0
    return out


@pytest.mark.slow
def test_ml1m_counts_match_the_published_protocol(ml1m):
    meta = Metadata.load(ml1m)
    assert meta.num_items == 3706 and meta.num_users == 6040
    assert meta.counts["valid_rows"] == 6040 and meta.counts["test_rows"] == 6040
    assert len(pq.read_table(ml1m / schema.VALID_DIR)) == 6040
    assert len(pq.read_table(ml1m / schema.TEST_DIR)) == 6040
    assert {f.name for f in meta.item_features} == {"i_genre", "i_decade"}
    assert {f.name for f in meta.user_features} == {"u_gender", "u_age", "u_occupation", "u_zip"}


@pytest.mark.slow
def test_ml1m_training_never_targets_a_last_or_second_last_event(ml1m):
    """Checked against the raw sequence file, not against our own split code."""
    items = raw_id_of(ml1m, "item")
    users = raw_id_of(ml1m, "user")
    with gzip.open(dataset_dir("ml-1m") / "sequences.txt.gz", "rt") as handle:
        sequences = {line.split()[0]: line.split()[1:] for line in handle if line.strip()}
    train = pq.read_table(ml1m / schema.TRAIN_DIR, columns=["user", "target", "ts", "history"]).to_pandas()
    assert len(train) == sum(len(s) - 3 for s in sequences.values())
    for user, target, position, history in train.sample(20_000, random_state=0).itertuples(index=False):
        sequence = sequences[users[user]]
        assert position <= len(sequence) - 3, "target is never the last or second-last event"
        assert items[target] == sequence[position]
        assert [items[h] for h in history] == sequence[max(0, position - 20):position], "history = prefix, newest last"
    test = pq.read_table(ml1m / schema.TEST_DIR).to_pandas()
    valid = pq.read_table(ml1m / schema.VALID_DIR).to_pandas()
    for frame, offset in ((test, 1), (valid, 2)):
        for user, targets, seen in frame[["user", "targets", "seen"]].head(500).itertuples(index=False):
            sequence = sequences[users[user]]
            assert [items[t] for t in targets] == [sequence[-offset]]
            assert [items[s] for s in seen] == sequence[:-offset]


@pytest.mark.slow
def test_ml100k_has_users_items_genres_and_user_features(tmp_path):
    out = tmp_path / "ml100k"
    assert prepare_main(["movielens", str(dataset_dir("ml-100k")), "--out", str(out)]) == 0
    meta = Metadata.load(out)
    assert meta.num_users == 943 and meta.num_items == 1682
    assert meta.counts["events"] == 100_000
    catalogue = pq.read_table(out / schema.ITEMS_FILE).to_pandas().set_index("raw_id")
    genres = raw_id_of(out, "i_genre")
    assert catalogue.loc["1", "title"] == "Toy Story (1995)"
    assert sorted(genres[g] for g in catalogue.loc["1", "i_genre"]) == ["Animation", "Children's", "Comedy"]
    users = pq.read_table(out / schema.USERS_FILE).to_pandas().set_index("raw_id")
    genders, occupations = raw_id_of(out, "u_gender"), raw_id_of(out, "u_occupation")
    assert genders[users.loc["1", "u_gender"]] == "M" and occupations[users.loc["1", "u_occupation"]] == "technician"
    train = pq.read_table(out / schema.TRAIN_DIR).to_pandas()
    assert {"u_age", "u_gender", "u_occupation", "u_zip", "c_hour", "c_dow"} <= set(train.columns)
    assert raw_id_of(out, "c_dow")[train["c_dow"].iloc[0]] in ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
    assert catalogue["freq"].sum() == len(train), "catalogue frequency counts training positives"


def test_context_ids_map_back_to_the_hour_and_weekday_serving_sends(tmp_path):
    """Each training row's c_hour and c_dow, read back through the id maps serving uses, are the UTC hour and
    weekday of its target's time (1970-01-01 00:00 UTC was a Thursday; times before it count too)."""
    saturday_2pm = int(pd.Timestamp("2026-11-28 14:05", tz="UTC").timestamp())
    times = [0, saturday_2pm, -3600, 86400 * 3 + 7200]
    times = [-10 ** 6, -10 ** 6 + 1] + sorted(times) + [10 ** 10, 10 ** 10 + 1]  # the last two are not trained on
    rows = [("u", item, t, 5.0) for item, t in enumerate(times)]
    rows += [("v", item, item, 5.0) for item in range(5)]
    write_interactions(tmp_path / "e.csv", rows, "csv")
    out = tmp_path / "out"
    assert prepare_main(["interactions", str(tmp_path / "e.csv"), "--user-col", "uid", "--item-col", "iid",
                         "--time-col", "when", "--out", str(out)]) == 0
    train = pq.read_table(out / schema.TRAIN_DIR).to_pandas()
    hours, days = raw_id_of(out, "c_hour"), raw_id_of(out, "c_dow")
    seen = {t: (hours[h], days[d]) for t, h, d in train[["ts", "c_hour", "c_dow"]].itertuples(index=False)}
    assert seen[0] == ("0", "Thu") and seen[saturday_2pm] == ("14", "Sat")
    assert seen[-3600] == ("23", "Wed") and seen[86400 * 3 + 7200] == ("2", "Sun")


def write_interactions(path, rows, fmt):
    frame = pd.DataFrame(rows, columns=["uid", "iid", "when", "stars"])
    if fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def interaction_rows(n_users=12, per_user=6, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"u{u}", int(rng.integers(100, 130)), 1000 * u + 10 * k + int(rng.integers(0, 5)),
             float(rng.integers(1, 6))) for u in range(n_users) for k in range(per_user)]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_interactions_with_feature_tables(tmp_path, fmt):
    rows = interaction_rows()
    events = tmp_path / f"events.{fmt}"
    write_interactions(events, rows, fmt)
    pd.DataFrame({"iid": range(100, 130), "title": [f"T{i}" for i in range(30)],
                  "tags": ["a|b" if i % 2 else "c" for i in range(30)], "brand": [f"b{i % 3}" for i in range(30)]}
                 ).to_csv(tmp_path / "items.csv", index=False)
    pd.DataFrame({"uid": [f"u{u}" for u in range(12)], "country": ["x", "y"] * 6}).to_csv(tmp_path / "users.csv",
                                                                                        index=False)
    out = tmp_path / "out"
    assert prepare_main(["interactions", str(events), "--user-col", "uid", "--item-col", "iid", "--time-col", "when",
                         "--rating-col", "stars", "--item-features", str(tmp_path / "items.csv"),
                         "--user-features", str(tmp_path / "users.csv"), "--out", str(out),
                         "--min-user-events", "3"]) == 0
    meta = Metadata.load(out)
    assert {(f.name, f.multi) for f in meta.item_features} == {("i_tags", True), ("i_brand", False)}
    assert [f.name for f in meta.user_features] == ["u_country"]
    assert meta.counts["train_examples"] == 12 * (6 - 3)
    catalogue = pq.read_table(out / schema.ITEMS_FILE).to_pandas().set_index("raw_id")
    tags = raw_id_of(out, "i_tags")
    some_odd = next(r for r in catalogue.index if int(r) % 2 == 1)
    assert sorted(tags[t] for t in catalogue.loc[some_odd, "i_tags"]) == ["a", "b"]
    assert catalogue.loc[some_odd, "title"] == f"T{int(some_odd) - 100}"


def test_rating_thresholds_filter_positives_and_relevant_targets(tmp_path):
    rows = [("u1", 1, 1, 5.0), ("u1", 2, 2, 1.0), ("u1", 3, 3, 5.0), ("u1", 4, 4, 5.0), ("u1", 5, 5, 2.0),
            ("u2", 1, 1, 5.0), ("u2", 3, 2, 5.0), ("u2", 2, 3, 5.0), ("u2", 5, 4, 5.0), ("u2", 4, 5, 5.0)]
    write_interactions(tmp_path / "e.csv", rows, "csv")
    out = tmp_path / "out"
    assert prepare_main(["interactions", str(tmp_path / "e.csv"), "--user-col", "uid", "--item-col", "iid",
                         "--time-col", "when", "--rating-col", "stars", "--min-positive-rating", "4",
                         "--min-relevant-rating", "4", "--out", str(out)]) == 0
    train = pq.read_table(out / schema.TRAIN_DIR).to_pandas()
    items = raw_id_of(out, "item")
    users = raw_id_of(out, "user")
    targets = defaultdict(list)
    for user, target in train[["user", "target"]].itertuples(index=False):
        targets[users[user]].append(items[target])
    assert sorted(targets["u1"]) == ["3"], "the rating-1 event is history only, never a positive"
    assert sorted(targets["u2"]) == ["2", "3"]
    test = pq.read_table(out / schema.TEST_DIR).to_pandas()
    assert [users[u] for u in test["user"]] == ["u2"], "u1's last event (rating 2) is not relevant"
    assert Metadata.load(out).counts["test_dropped_users"] == 1


def test_time_split_never_leaks_and_keeps_several_targets(tmp_path):
    rows = interaction_rows(n_users=20, per_user=10, seed=1)
    rows = [(u, i, t % 1000 * 7 + int(u[1:]), r) for u, i, t, r in rows]  # interleave users in time
    write_interactions(tmp_path / "e.parquet", rows, "parquet")
    out = tmp_path / "out"
    assert prepare_main(["interactions", str(tmp_path / "e.parquet"), "--user-col", "uid", "--item-col", "iid",
                         "--time-col", "when", "--protocol", "time", "--valid-fraction", "0.2",
                         "--test-fraction", "0.2", "--min-user-events", "1", "--out", str(out)]) == 0
    ts = np.sort([t for _, _, t, _ in rows])
    valid_start = np.quantile(ts, 0.6, method="lower")
    train = pq.read_table(out / schema.TRAIN_DIR).to_pandas()
    assert train["ts"].max() < valid_start
    test = pq.read_table(out / schema.TEST_DIR).to_pandas()
    assert (test["targets"].map(len) > 1).any(), "a time split can give a user several relevant items"
    items_in_train = set(train["target"]) | {h for hist in train["history"] for h in hist}
    assert all(t in items_in_train for targets in test["targets"] for t in targets), "cold items dropped"


def test_sequence_file_with_item_attributes(tmp_path):
    path = tmp_path / "seq.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("1 10 11 12 13\n2 11 12 14\n3 10 14 13 12 11\n")
    (tmp_path / "attrs.json").write_text(json.dumps({"10": [1, 2], "11": [2], "12": [], "13": [3], "14": [1]}))
    out = tmp_path / "out"
    assert prepare_main(["sequences", str(path), "--item-attributes", str(tmp_path / "attrs.json"),
                         "--min-user-events", "3", "--out", str(out)]) == 0
    meta = Metadata.load(out)
    assert meta.num_items == 5 and meta.context_features == [], "positions are not clock time"
    assert not meta.event_times, "nor are they event times"
    sequences = pq.read_table(out / schema.SEQUENCES_DIR)
    assert schema.SEQUENCE_TIMES not in sequences.column_names
    assert meta.counts["train_examples"] == 1 + 0 + 2
    catalogue = pq.read_table(out / schema.ITEMS_FILE).to_pandas().set_index("raw_id")
    attrs = raw_id_of(out, "i_attr")
    assert sorted(attrs[a] for a in catalogue.loc["10", "i_attr"]) == ["1", "2"]


def test_movielens_dat_and_csv_layouts(tmp_path):
    dat = tmp_path / "ml-10m"
    dat.mkdir()
    lines = [f"{u}::{i}::{(u + i) % 5 + 1}::{1000 + 10 * k}" for u in (1, 2, 3) for k, i in enumerate((5, 6, 7, 8))]
    (dat / "ratings.dat").write_text("\n".join(lines) + "\n")
    (dat / "movies.dat").write_text("5::Five (1995)::Comedy|Drama\n6::Six (1987)::Action\n7::Seven (2001)::Drama\n"
                                    "8::Eight (1999)::(no genres listed)\n")
    assert prepare_main(["movielens", str(dat), "--out", str(tmp_path / "a"), "--min-user-events", "3"]) == 0
    meta = Metadata.load(tmp_path / "a")
    assert meta.num_items == 4 and {f.name for f in meta.item_features} == {"i_genre", "i_decade"}
    assert meta.event_times
    sequences = pq.read_table(tmp_path / "a" / schema.SEQUENCES_DIR).to_pylist()
    assert [row[schema.SEQUENCE_TIMES] for row in sequences] == [[1000, 1010]] * 3, "each event's time, in order"
    test = pq.read_table(tmp_path / "a" / schema.TEST_DIR).to_pylist()
    assert [(row[schema.HISTORY_TIMES], row[schema.TIMESTAMP]) for row in test] == [([1000, 1010, 1020], 1030)] * 3
    csv = tmp_path / "ml-25m"
    csv.mkdir()
    (csv / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(
        f"{u},{i},{(u + i) % 5 + 0.5},{1000 + k}" for u in (1, 2, 3) for k, i in enumerate((5, 6, 7, 8))) + "\n")
    (csv / "movies.csv").write_text('movieId,title,genres\n5,"Five, The (1995)",Comedy|Drama\n6,Six (1987),Action\n'
                                    "7,Seven (2001),Drama\n8,Eight (1999),(no genres listed)\n")
    assert prepare_main(["movielens", str(csv), "--out", str(tmp_path / "b"), "--min-user-events", "3"]) == 0
    catalogue = pq.read_table(tmp_path / "b" / schema.ITEMS_FILE).to_pandas().set_index("raw_id")
    assert catalogue.loc["5", "title"] == "Five, The (1995)"
    assert len(catalogue.loc["8", "i_genre"]) == 0


def test_synthetic_is_seeded_and_written_atomically(tmp_path):
    args = ["synthetic", "--users", "200", "--items", "100", "--mean-events", "10"]
    assert prepare_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert prepare_main(args + ["--out", str(tmp_path / "b")]) == 0
    assert prepare_main(args + ["--out", str(tmp_path / "c"), "--seed", "1"]) == 0
    a = pq.read_table(tmp_path / "a" / schema.TRAIN_DIR)
    assert a.equals(pq.read_table(tmp_path / "b" / schema.TRAIN_DIR))
    assert not a.equals(pq.read_table(tmp_path / "c" / schema.TRAIN_DIR))
    source = Metadata.load(tmp_path / "a").source
    assert source["kind"] == "synthetic"
    generator = {k: v for k, v in source.items() if k not in ("kind", "path", "engine", "checksum", "files")}
    config = json.dumps({"synthetic": generator}, sort_keys=True).encode()
    assert source["checksum"] == hashlib.sha256(config).hexdigest()
    assert source["checksum"] != hashlib.sha256(b"").hexdigest(), "the checksum is of the generator's config"
    assert source["checksum"] == Metadata.load(tmp_path / "b").source["checksum"]
    assert source["checksum"] != Metadata.load(tmp_path / "c").source["checksum"], "another seed, another checksum"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temp directories left behind"


def test_training_shuffle_is_the_same_however_it_is_chunked_and_spilled(tmp_path, monkeypatch):
    """Many parts, built from many groups of users and flushed to the shuffle's bucket files after every group,
    give the same files byte for byte as a few groups held in memory."""
    from data.prepare import duckdb_engine, plan

    args = ["synthetic", "--users", "1000", "--items", "200", "--mean-events", "20"]
    monkeypatch.setattr(plan, "CHUNK_VALUES", 2_000)
    assert prepare_main(args + ["--out", str(tmp_path / "few")]) == 0
    monkeypatch.setattr(plan, "CHUNK_EVENTS", 300)
    monkeypatch.setattr(duckdb_engine, "SPILL_BYTES", 1)
    assert prepare_main(args + ["--out", str(tmp_path / "many")]) == 0
    few = sorted((tmp_path / "few" / schema.TRAIN_DIR).iterdir())
    many = sorted((tmp_path / "many" / schema.TRAIN_DIR).iterdir())
    assert len(few) > 1 and [p.name for p in few] == [p.name for p in many]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(few, many))
    with pytest.raises(ValueError, match="_bucket order"):
        spill = duckdb_engine.Spill(str(tmp_path / "spill"), 2)
        spill.add(pa.table({"_bucket": [1, 0]}))
