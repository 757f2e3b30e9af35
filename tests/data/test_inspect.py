"""`python -m data.inspect`: the data layer end to end from the command line."""

from __future__ import annotations

from data.inspect import main as inspect_main
from data.prepare.cli import main as prepare_main


def test_inspect_streams_a_prepared_dataset(tmp_path, capsys):
    out = tmp_path / "syn"
    args = ["synthetic", "--users", "300", "--items", "100", "--mean-events", "10", "--out", str(out)]
    assert prepare_main(args) == 0
    assert inspect_main([str(out), "--batch-size", "64", "--negatives", "16"]) == 0
    printed = capsys.readouterr().out
    train_examples = int(printed.split("train_examples=")[1].split(",")[0])
    assert f"streamed {train_examples} examples" in printed
    assert inspect_main([str(tmp_path / "missing")]) == 2
    assert "metadata.json" in capsys.readouterr().err
