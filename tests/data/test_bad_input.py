"""Every bad input gets one clear error naming the file and the column, and nothing is left behind."""

from __future__ import annotations

import gzip
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import LoaderConfig, NegativesConfig
from data.errors import DataError
from data.loader import open_loader
from data.prepare.cli import main as prepare_main
from tests.conftest import ROOT, recommit

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


def test_missing_metadata_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError) as err:
        open_loader(tmp_path, LoaderConfig())
    assert "metadata.json" in str(err.value) and "data.prepare" in str(err.value)


def test_csv_with_non_numeric_timestamps(tmp_path, capsys):
    path = tmp_path / "events.csv"
    pd.DataFrame({**GOOD, "when": ["x"] * 8}).to_csv(path, index=False)
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "'when'" in message


# Bad raw sources: every wrong token is named with its file, line and value; nothing becomes a
# wrong id, a NaN rating or a silently dropped row.

def prepare_fails(tmp_path, capsys, args: list[str]) -> str:
    out = tmp_path / "out"
    code = prepare_main([*args, "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2, message
    assert not out.exists() or out.is_file(), "no partial output"
    return message


def movielens_dir(tmp_path, ratings: str, movies: str | None = "1::One (1995)::Drama\n2::Two (1996)::Comedy\n"):
    directory = tmp_path / "ml"
    directory.mkdir()
    (directory / "ratings.dat").write_text(ratings)
    if movies is not None:
        (directory / "movies.dat").write_text(movies)
    return directory


GOOD_RATINGS = "".join(f"{u}::{i}::{(u + i) % 5 + 1}::{978300760 + i}\n" for u in (1, 2) for i in (1, 2, 1, 2, 1))


def test_movielens_ids_must_be_integers(tmp_path, capsys):
    directory = movielens_dir(tmp_path, GOOD_RATINGS + "abc::2::3::978300761\n")
    message = prepare_fails(tmp_path, capsys, ["movielens", str(directory)])
    assert f"{directory / 'ratings.dat'}: column 'user'" in message and "'abc' on line 11" in message


def test_movielens_field_count_names_the_real_separator(tmp_path, capsys):
    directory = movielens_dir(tmp_path, GOOD_RATINGS + "1::2::3::978300761::extra\n")
    message = prepare_fails(tmp_path, capsys, ["movielens", str(directory)])
    assert "4 '::'-separated fields" in message and "line 11" in message and "'\\t'" not in message


@pytest.mark.parametrize("rating", ["7", "abc", "0", "nan"])
def test_movielens_ratings_outside_the_star_scale(tmp_path, capsys, rating):
    directory = movielens_dir(tmp_path, GOOD_RATINGS + f"1::2::{rating}::978300761\n")
    message = prepare_fails(tmp_path, capsys, ["movielens", str(directory)])
    assert "column 'rating'" in message and "0.5 to 5 stars" in message and f"'{rating}' on line 11" in message


def test_movies_missing_or_incomplete_is_a_warning_with_examples(tmp_path, capsys):
    ratings = GOOD_RATINGS + "".join(f"3::{i}::4::97830077{i}\n" for i in (1, 2, 7, 8, 9))
    directory = movielens_dir(tmp_path, ratings, movies="1::One (1995)::Drama\n2::Two (1996)::Comedy\n")
    assert prepare_main(["movielens", str(directory), "--out", str(tmp_path / "a"), "--min-user-events", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "movies.dat: 3 item ids" in err and "7, 8, 9" in err
    (directory / "movies.dat").unlink()
    assert prepare_main(["movielens", str(directory), "--out", str(tmp_path / "b"), "--min-user-events", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "movies.dat not found" in err


def sequence_file(tmp_path, text: str):
    path = tmp_path / "seq.txt"
    path.write_text(text)
    return path


def test_sequence_tokens_must_be_integers_unless_string_ids(tmp_path, capsys):
    path = sequence_file(tmp_path, "1 10 11 12 13\n\n2 20 x 22 23\n")
    message = prepare_fails(tmp_path, capsys, ["sequences", str(path), "--min-user-events", "3"])
    assert str(path) in message and "column 'items'" in message and "'x' on line 3" in message
    assert "--string-ids" in message
    out = tmp_path / "ok"
    assert prepare_main(["sequences", str(path), "--min-user-events", "3", "--string-ids", "--out", str(out)]) == 0
    assert "x" in pq.read_table(out / "id_maps" / "item.parquet").column("raw").to_pylist()


def test_a_user_on_two_sequence_lines_is_an_error(tmp_path, capsys):
    path = sequence_file(tmp_path, "1 10 11 12\n2 20 21 22\n1 13 14\n")
    message = prepare_fails(tmp_path, capsys, ["sequences", str(path), "--min-user-events", "3"])
    assert "one line per user" in message and "user '1' on lines 1 and 3" in message


def test_latin1_csv_names_the_encoding_option(tmp_path, capsys):
    path = tmp_path / "events.csv"
    rows = "uid,iid,when\n" + "".join(f"{u},{i},{i}\n" for u in ("Jos\xe9", "b") for i in range(4))
    path.write_bytes(rows.encode("latin-1"))
    message = run_prepare(tmp_path, capsys, path)
    assert str(path) in message and "utf-8" in message and "--encoding latin-1" in message
    out = tmp_path / "ok"
    assert prepare_main(["interactions", str(path), *FLAGS, "--encoding", "latin-1", "--out", str(out)]) == 0
    assert "José" in pq.read_table(out / "id_maps" / "user.parquet").column("raw").to_pylist()


def test_ids_beyond_int64_stay_exact_in_csv_and_are_named_in_parquet(tmp_path, capsys):
    path = tmp_path / "events.csv"
    big = "20000000000000000000"
    path.write_text("uid,iid,when\n" + "".join(f"{u},{i},{i}\n" for u in (big, "7") for i in range(1, 5)))
    out = tmp_path / "ok"
    assert prepare_main(["interactions", str(path), *FLAGS, "--out", str(out)]) == 0
    assert big in pq.read_table(out / "id_maps" / "user.parquet").column("raw").to_pylist()
    parquet_path = parquet(tmp_path, changed("uid", 2, 2e19))
    message = run_prepare(tmp_path, capsys, parquet_path)
    assert "'uid'" in message and "2e+19 on row 3" in message


def test_nan_times_and_ratings_are_named(tmp_path, capsys):
    path = parquet(tmp_path, changed("when", 1, float("nan")))
    assert "'when'" in (message := run_prepare(tmp_path, capsys, path)) and "nan on row 2" in message
    path = parquet(tmp_path, {**GOOD, "r": changed("when", 2, float("nan"))["when"]}, "r.parquet")
    message = run_prepare(tmp_path, capsys, path, "--rating-col", "r")
    assert "'r'" in message and "finite numbers" in message and "nan on row 3" in message


def test_out_pointing_at_a_file(tmp_path, capsys):
    good = parquet(tmp_path, GOOD)
    target = tmp_path / "out"
    target.write_text("not a directory")
    code = prepare_main(["interactions", str(good), *FLAGS, "--out", str(target)])
    message = capsys.readouterr().err
    assert code == 2 and str(target) in message and "an existing file" in message
    assert target.read_text() == "not a directory"


def test_temp_folders_of_a_killed_prepare_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "data.prepare", "synthetic", "--users", "60000", "--out", str(out)]
    victim = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".synthetic.tmp-*")) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert [p.name for p in tmp_path.glob(".synthetic.tmp-*")] == [f".synthetic.tmp-{victim.pid}"], "left behind"
    subprocess.run([*cmd[:-4], "--users", "200", "--items", "100", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_an_error_after_the_progress_bar_starts_on_its_own_line(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("user,item,ts\nu1,a,1\nu1,b,2\nu1,c,3\nu2,b,1\nu2,c,2\nu2,d,3\n")
    result = subprocess.run([sys.executable, "-m", "data.prepare", "interactions", str(path), "--user-col", "user",
                             "--item-col", "item", "--time-col", "ts", "--min-user-events", "3", "--out",
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert "prepare:" in result.stderr, "the bar had started"
    error_line = next(line for line in result.stderr.splitlines() if "error:" in line)
    assert error_line.startswith("error: "), repr(error_line)

