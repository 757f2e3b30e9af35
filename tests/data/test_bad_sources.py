"""Bad raw sources (MovieLens files, sequence files, CSV encodings and big ids): every wrong token is named with its
file, line and value; nothing becomes a wrong id, a NaN rating or a silently dropped row."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from data.prepare.cli import main as prepare_main
from tests.conftest import ROOT
from tests.data.test_bad_input import FLAGS, GOOD, changed, parquet, run_prepare

# Two users with four events: the least leave-one-out needs for a non-empty training split.

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


def test_a_negative_sequence_token_is_called_negative(tmp_path, capsys):
    path = sequence_file(tmp_path, "1 10 11 -12 13\n2 20 21 22 23\n")
    message = prepare_fails(tmp_path, capsys, ["sequences", str(path), "--min-user-events", "3"])
    assert "'-12' (negative) on line 1" in message and "beyond int64" not in message
