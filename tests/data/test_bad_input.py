"""Every bad input gets one clear error naming the file and the column, and nothing is left behind."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import LoaderConfig, NegativesConfig
from data.errors import DataError
from data.loader import open_loader
from data.prepare.cli import main as prepare_main
from tests.conftest import recommit

# Two users with four events: the least leave-one-out needs for a non-empty training split.
GOOD = {"uid": [1, 1, 1, 1, 2, 2, 2, 2], "iid": [10, 11, 12, 13, 10, 12, 13, 14], "when": [1, 2, 3, 4, 1, 2, 3, 4]}


def changed(column: str, row: int, value) -> dict:
    """GOOD with one cell replaced (row is 0-based)."""
    values = [float(v) if isinstance(value, float) else v for v in GOOD[column]]
    values[row] = value
    return {**GOOD, column: values}
FLAGS = ["--user-col", "uid", "--item-col", "iid", "--time-col", "when", "--min-user-events", "3"]


def run_prepare(tmp_path, capsys, path, *extra):
    out = tmp_path / "out"
    code = prepare_main(["interactions", str(path), *FLAGS, *extra, "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2, message
    assert not out.exists(), "no partial output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no temp directory left"
    return message


def parquet(tmp_path, columns, name="events.parquet"):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def test_missing_file(tmp_path, capsys):
    message = run_prepare(tmp_path, capsys, tmp_path / "nope.parquet")
    assert "nope.parquet" in message and "no such file" in message


def test_missing_column(tmp_path, capsys):
    path = parquet(tmp_path, {k: v for k, v in GOOD.items() if k != "when"})
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'when'" in message and "columns ['uid', 'iid']" in message


def test_wrong_type(tmp_path, capsys):
    path = parquet(tmp_path, {**GOOD, "when": list("abcdefgh")})
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'when'" in message and "numeric or timestamp" in message


def test_float_ids_are_the_wrong_type(tmp_path, capsys):
    path = parquet(tmp_path, changed("iid", 0, 1.5))
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'iid'" in message and "integer or string ids" in message


def test_nulls(tmp_path, capsys):
    path = parquet(tmp_path, {**GOOD, "uid": pa.array(changed("uid", 1, None)["uid"], pa.int64())})
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'uid'" in message and "a null on row 2" in message


def test_negative_ids(tmp_path, capsys):
    path = parquet(tmp_path, changed("iid", 2, -12))
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'iid'" in message and "non-negative" in message and "-12 on row 3" in message


def test_corrupt_parquet(tmp_path, capsys):
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1 this is not really parquet PAR1")
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "a valid Parquet file" in message


def test_empty_files(tmp_path, capsys):
    path = tmp_path / "events.csv"
    path.write_text("")
    assert "an empty file" in run_prepare(tmp_path, capsys, path)
    path = parquet(tmp_path, {k: pa.array([], pa.int64()) for k in GOOD})
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "no rows" in message


def test_user_with_one_event(tmp_path, capsys):
    path = parquet(tmp_path, {"uid": [1, 1, 1, 1, 2], "iid": [10, 11, 12, 13, 10], "when": [1, 2, 3, 4, 1]})
    message = run_prepare(tmp_path, capsys, path, "--min-user-events", "1")
    assert str(path) in message and "'uid'" in message and "user '2' with 1" in message
    assert "--min-user-events" in message


def test_sequence_line_without_items(tmp_path, capsys):
    path = tmp_path / "seq.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("1 10 11 12\n2\n")
    code = prepare_main(["sequences", str(path), "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == 2 and str(path) in message and "'items'" in message and "line 2" in message


def test_failed_overwrite_keeps_the_old_output(tmp_path, capsys):
    good = parquet(tmp_path, GOOD, "good.parquet")
    out = tmp_path / "out"
    assert prepare_main(["interactions", str(good), *FLAGS, "--out", str(out)]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = parquet(tmp_path, changed("iid", 2, -12), "bad.parquet")
    assert prepare_main(["interactions", str(bad), *FLAGS, "--out", str(out), "--overwrite"]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert prepare_main(["interactions", str(good), *FLAGS, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


# The loader validates prepared files as it reads them: the same errors, never a kernel crash.

def corrupt_part(path, info, transform):
    """A bad part, committed as if prepare had written it: the loader's own checks must name it."""
    part = path / info["meta"].files["train"][1]
    pq.write_table(transform(pq.read_table(part)), part, row_group_size=16)
    recommit(path)
    return part


def loader_error(path) -> str:
    with pytest.raises(DataError) as err:
        for _ in open_loader(path, LoaderConfig(batch_size=8), negatives=NegativesConfig(num_sampled=2)).epoch(0):
            pass
    return str(err.value)


def set_history_values(table, values):
    history = table.column("history").combine_chunks()
    return table.set_column(1, "history", pa.ListArray.from_arrays(history.offsets, pa.array(values)))


@pytest.mark.parametrize("case,transform,expect", [
    ("missing column", lambda t: t.drop(["u_age"]), ("'u_age'", "a column with this name")),
    ("wrong type", lambda t: t.set_column(2, "u_age", pa.array([str(v) for v in t.column("u_age").to_pylist()])),
     ("'u_age'", "int64 ids", "type string")),
    ("nulls", lambda t: t.set_column(4, "target", pa.array([None] + t.column("target").to_pylist()[1:],
                                                            pa.int64())), ("'target'", "no nulls")),
    ("negative ids", lambda t: set_history_values(t, -np.ones(len(t.column("history").combine_chunks().values),
                                                              dtype=np.int64)), ("'history'", "non-negative")),
    ("out of vocabulary", lambda t: t.set_column(2, "u_age", pa.array(np.full(len(t), 99))),
     ("'u_age'", "below the vocabulary size 8", "found 99")),
])
def test_loader_rejects_bad_prepared_files(fake_prepared, case, transform, expect):
    path, info = fake_prepared()
    part = corrupt_part(path, info, transform)
    message = loader_error(path)
    assert str(part) in message, case
    for fragment in expect:
        assert fragment in message, (case, message)


def test_loader_hashes_out_of_vocabulary_ids_when_configured(fake_prepared):
    path, info = fake_prepared()
    corrupt_part(path, info, lambda t: t.set_column(2, "u_age", pa.array(np.full(len(t), 8 * 3 + 5))))
    loader = open_loader(path, LoaderConfig(batch_size=8, out_of_vocab="hash"),
                         negatives=NegativesConfig(num_sampled=2))
    ages = set()
    for batch in loader.epoch(0):
        ages.update(batch.sparse["u_age"].values().tolist())
    assert max(ages) < 8 and 5 in ages


def test_loader_rejects_corrupt_empty_and_missing_parquet(fake_prepared):
    path, info = fake_prepared()
    part = path / info["meta"].files["train"][2]
    part.write_bytes(b"garbage")
    recommit(path)
    assert str(part) in loader_error(path) and "a valid Parquet file" in loader_error(path)
    part.write_bytes(b"")
    recommit(path)
    assert "an empty file" in loader_error(path)
    pq.write_table(pq.read_table(path / info["meta"].files["train"][0]).slice(0, 0), part)
    recommit(path)
    assert str(part) in loader_error(path) and "no rows" in loader_error(path)
    part.unlink()
    recommit(path)
    assert str(part) in loader_error(path) and "no such file" in loader_error(path)


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_a_dataset_damaged_after_prepare_is_named_before_any_batch(fake_prepared, damage):
    """The manifest prepare wrote last records every file's size: a part cut short or lost afterwards, or a lost
    manifest, is named when the dataset is opened, never read as if complete."""
    path, info = fake_prepared()
    part = path / info["meta"].files["train"][1]
    if damage == "truncate":
        part.write_bytes(part.read_bytes()[:100])
    elif damage == "delete":
        part.unlink()
    else:
        (path / "_manifest.json").unlink()
    with pytest.raises(DataError) as err:
        open_loader(path, LoaderConfig(batch_size=8), negatives=NegativesConfig(num_sampled=2))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    name = part.relative_to(path)
    expected = {"truncate": f"{name} has 100 bytes, but", "delete": f"{name} is missing",
                "manifest": "no _manifest.json"}[damage]
    assert expected in message, message


@pytest.mark.parametrize("column", ["uid", "iid"])
def test_an_empty_id_field_in_a_csv_is_named_not_trained_on(tmp_path, capsys, column):
    """An empty CSV field would be the id '' otherwise: in the catalogue, trained on and served."""
    path = tmp_path / "events.csv"
    frame = pd.DataFrame(GOOD).astype(str)
    frame.loc[2, column] = ""
    frame.to_csv(path, index=False)
    message = run_prepare(tmp_path, capsys, path)
    assert message.strip().endswith(f"error: {path}: column '{column}': expected non-empty ids; found an empty id "
                                    f"on line 4"), message


@pytest.mark.parametrize("column", ["when", "rating"])
def test_an_empty_number_in_a_csv_is_named_as_a_null(tmp_path, capsys, column):
    path = tmp_path / "events.csv"
    frame = pd.DataFrame({**GOOD, "rating": [4] * 8}).astype(str)
    frame.loc[5, column] = ""
    frame.to_csv(path, index=False)
    message = run_prepare(tmp_path, capsys, path, "--rating-col", "rating")
    assert message.strip().endswith(f"error: {path}: column '{column}': expected no nulls; found a null on line 7"), \
        message


def test_truncated_metadata_is_named_by_the_trainer_in_one_line(fake_prepared, capsys):
    from trainer.__main__ import main as trainer_main

    path, _ = fake_prepared()
    metadata = path / "metadata.json"
    metadata.write_bytes(metadata.read_bytes()[:100])
    assert trainer_main([f"data.path={path}", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: expected a prepared dataset: metadata.json and _manifest.json, written "
                          f"by `python -m data.prepare`; found metadata.json has 100 bytes, but "), err
    assert err.endswith(" were committed") and len(err.splitlines()) == 1, err


def test_corrupt_metadata_of_the_same_size_is_named_with_its_line(fake_prepared):
    """A truncated metadata.json fails the manifest's size check (test above); one overwritten in place keeps its
    size, and its JSON error names the file, line and column instead of a JSONDecodeError traceback."""
    path, _ = fake_prepared()
    metadata = path / "metadata.json"
    text = metadata.read_bytes()
    metadata.write_bytes(text[:-40] + b"\x00" * 39 + text[-1:])
    with pytest.raises(DataError) as err:
        open_loader(path, LoaderConfig())
    message = str(err.value)
    assert message.startswith(f"{metadata}: expected JSON metadata written by `python -m data.prepare`; found ")
    assert " line " in message and "column" in message and "\n" not in message


def test_missing_metadata_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError) as err:
        open_loader(tmp_path, LoaderConfig())
    assert "metadata.json" in str(err.value) and "data.prepare" in str(err.value)


def test_csv_with_non_numeric_timestamps(tmp_path, capsys):
    path = tmp_path / "events.csv"
    pd.DataFrame({**GOOD, "when": ["x"] * 8}).to_csv(path, index=False)
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'when'" in message
