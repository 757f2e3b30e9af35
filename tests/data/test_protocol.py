"""The evaluation protocol end to end on hand-made files: repeats, duplicate rows and empty splits.

Expected metrics are computed by hand in the comments, for the popularity scorer (its ranking is
known), through the real prepare, loader and evaluator.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from config import ConfigError, LoaderConfig
from data.loader import open_loader
from data.prepare.cli import main as prepare_main
from data.schema import Metadata
from tests.conftest import ROOT, TINY_MODEL, tiny_config
from trainer import distributed
from trainer.evaluate import evaluate, popularity_scorer
from trainer.loop import build

# u1 and u4 re-consume items; dense ids follow the sorted raw ids: a=1, b=2, c=3, d=4, e=5.
REPEATS = {"u1": "abacab", "u2": "babcd", "u3": "cae", "u4": "acc"}
FLAGS = ["--user-col", "user", "--item-col", "item", "--time-col", "ts", "--min-user-events", "3"]


def write_events(path, sequences: dict[str, str], copies: int = 1):
    rows = [(user, item, t) for user, items in sequences.items() for t, item in enumerate(items)] * copies
    pd.DataFrame(rows, columns=["user", "item", "ts"]).to_csv(path, index=False)
    return path


def prepared(tmp_path, capsys, sequences, copies=1):
    out = tmp_path / "out"
    code = prepare_main(["interactions", str(write_events(tmp_path / "e.csv", sequences, copies)), *FLAGS,
                         "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return out, captured.out


def popularity_metrics(out, split, filter_seen=True):
    loader = open_loader(out, LoaderConfig(batch_size=3), split)
    return evaluate(popularity_scorer(loader.catalogue.freq), loader.epoch(0), [1, 2, 3], loader.meta.num_items,
                    torch.device("cpu"), filter_seen)


def test_repeats_are_measured_and_left_out_of_the_seen_filtered_metrics(tmp_path, capsys):
    out, printed = prepared(tmp_path, capsys, REPEATS)
    meta = Metadata.load(out)
    # Training positives (events after the first, before the last two): u1 b, a, c; u2 a, b.
    # freq a=2, b=2, c=1, d=e=0, so popularity ranks a, b, c, d, e.
    assert meta.counts["train_examples"] == 5
    assert meta.repeats["valid"] == {"queries": 4, "targets": 4, "repeat_targets": 1, "repeat_share": 0.25,
                                     "queries_all_repeat": 1}
    assert meta.repeats["test"]["repeat_targets"] == 2 and meta.repeats["test"]["queries_all_repeat"] == 2
    assert json.loads((out / "metadata.json").read_text())["repeats"]["test"]["repeat_share"] == 0.5
    assert "25.0% of validation targets (1 of 4)" in printed and "50.0% of test targets (2 of 4)" in printed
    assert "eval.filter_seen=false" in printed
    valid = popularity_metrics(out, "valid")
    # u1 valid target a was seen: skipped. u2 c (a, b seen) rank 1; u3 a (c seen) rank 1; u4 c (a seen) rank 2.
    assert (valid["users"], valid["skipped"]) == (3, 1)
    assert valid["hr@1"] == pytest.approx(2 / 3) and valid["mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    test = popularity_metrics(out, "test")
    # u1 test b and u4 test c were seen: skipped. u2 d (a, b, c seen) rank 1; u3 e (a, c seen) rank 3: b, d, e.
    assert (test["users"], test["skipped"]) == (2, 2)
    assert test["hr@1"] == pytest.approx(1 / 2) and test["hr@3"] == 1.0
    assert test["mrr"] == pytest.approx((1 + 1 / 3) / 2)


def test_without_seen_filtering_every_query_counts(tmp_path, capsys):
    out, _ = prepared(tmp_path, capsys, REPEATS)
    valid = popularity_metrics(out, "valid", filter_seen=False)
    # Ranking a, b, c, d, e for everyone: u1 a 1, u2 c 3, u3 a 1, u4 c 3.
    assert (valid["users"], valid["skipped"]) == (4, 0)
    assert valid["hr@1"] == pytest.approx(2 / 4) and valid["mrr"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 3) / 4)
    test = popularity_metrics(out, "test", filter_seen=False)
    # u1 b 2, u2 d 4, u3 e 5, u4 c 3.
    assert test["hr@1"] == 0.0 and test["mrr"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 5 + 1 / 3) / 4)


def test_duplicate_rows_are_one_event(tmp_path, capsys):
    sequences = {"u1": "abcdefgh", "u2": "hgfedcba", "u3": "acegbdfh"}  # 3 users, 8 items
    out, printed = prepared(tmp_path, capsys, sequences, copies=2)
    meta = Metadata.load(out)
    rows = sum(len(s) for s in sequences.values())
    assert meta.counts["train_examples"] == sum(len(s) - 3 for s in sequences.values()) == 15
    assert meta.counts["duplicate_rows"] == rows and meta.counts["events"] == rows
    assert f"dropped {rows} duplicate rows" in printed
    assert meta.repeats["valid"]["repeat_targets"] == meta.repeats["test"]["repeat_targets"] == 0
    assert popularity_metrics(out, "test")["users"] == 3


@pytest.mark.parametrize("sequences,split,hint", [
    ({"u1": "abc", "u2": "bcd"}, "training", "at least 4 events (the most active has 3)"),
])
def test_an_empty_split_fails_prepare_naming_it_and_the_filters(tmp_path, capsys, sequences, split, hint):
    out = tmp_path / "out"
    code = prepare_main(["interactions", str(write_events(tmp_path / "e.csv", sequences)), *FLAGS, "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert f"a non-empty {split} split" in message and hint in message
    assert "--min-user-events 3" in message and "--protocol leave_one_out" in message


def test_relevance_threshold_that_empties_validation_names_it(tmp_path, capsys):
    rows = [("u1", i, t, 5.0 if t != 3 else 1.0) for t, i in enumerate("abcde")]
    pd.DataFrame(rows, columns=["user", "item", "ts", "r"]).to_csv(tmp_path / "e.csv", index=False)
    code = prepare_main(["interactions", str(tmp_path / "e.csv"), *FLAGS, "--rating-col", "r",
                         "--min-relevant-rating", "4", "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == 2 and "a non-empty validation split" in message and "--min-relevant-rating 4.0" in message


def test_filters_that_leave_nothing_say_what_the_data_had(tmp_path, capsys):
    code = prepare_main(["interactions", str(write_events(tmp_path / "e.csv", {"u1": "abc", "u2": "ab"})),
                         "--user-col", "user", "--item-col", "item", "--time-col", "ts", "--out", str(tmp_path / "o")])
    message = capsys.readouterr().err
    assert code == 2
    assert "--min-user-events 5" in message and "--min-item-events 1" in message
    assert "the most active user has 3 events" in message


def test_filter_counts_are_printed(tmp_path, capsys):
    sequences = {f"u{n}": "abcdef" for n in range(3)} | {"short": "ab"}
    out = tmp_path / "out"
    assert prepare_main(["interactions", str(write_events(tmp_path / "e.csv", sequences)), "--user-col", "user",
                         "--item-col", "item", "--time-col", "ts", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dropped 1 users, 0 items and 2 events" in printed
    assert Metadata.load(out).counts["dropped_users"] == 1


def test_the_synthetic_default_has_no_repeats_and_the_option_has_them(tmp_path, capsys):
    args = ["synthetic", "--users", "300", "--items", "200", "--mean-events", "20"]
    assert prepare_main(args + ["--out", str(tmp_path / "a")]) == 0
    assert Metadata.load(tmp_path / "a").repeats["test"]["repeat_targets"] == 0
    assert prepare_main(args + ["--allow-repeats", "--out", str(tmp_path / "b")]) == 0
    assert Metadata.load(tmp_path / "b").repeats["test"]["repeat_share"] > 0.2


def test_the_trainer_refuses_splits_it_could_not_evaluate(tmp_path, capsys):
    out, _ = prepared(tmp_path, capsys, {"u1": "abcda", "u2": "bcdab", "u3": "cdeac"})  # every test target a repeat
    assert Metadata.load(out).repeats["test"]["queries_all_repeat"] == 3
    with pytest.raises(ConfigError, match="leaves no test query to evaluate.*eval.filter_seen=false"):
        build(tiny_config(out), distributed.init("cpu"))
    job = build(tiny_config(out, **{"eval.filter_seen": "false"}), distributed.init("cpu"))
    assert set(job.data.eval_loaders) == {"valid", "test"}


def test_a_time_split_needs_times(tmp_path, capsys):
    path = tmp_path / "seq.txt"
    path.write_text("1 10 11 12 13\n2 11 12 13 14\n")
    code = prepare_main(["sequences", str(path), "--protocol", "time", "--min-user-events", "3", "--out",
                         str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert code == 2 and "event times for --protocol time" in message and "leave_one_out" in message


@pytest.mark.slow
def test_every_row_doubled_trains_like_the_original(tmp_path, capsys):
    """The reported case: every row of a 3-user, 8-item file written twice gave 39 training examples and
    hr@200=0.0000 on the 8-item catalogue. With the copies dropped, HR@200 must be exactly 1."""
    sequences = {"u1": "abcdefgh", "u2": "hgfedcba", "u3": "acegbdfh"}
    out, _ = prepared(tmp_path, capsys, sequences, copies=2)
    summary = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "trainer", f"data.path={out}", *TINY_MODEL,
                             "tracking.enabled=false", "train.epochs=1", "--summary", str(summary)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reach the catalogue size (8 items)" in result.stderr
    test = json.loads(summary.read_text())["test"]
    assert (test["users"], test["skipped"], test["hr@200"]) == (3, 0, 1.0)
