"""The docs' benchmark tables are generated from bench/results/*.json: a committed page that differs from what its
JSON generates fails here (`make docs` rewrites them)."""

from __future__ import annotations

import json
import shutil

from bench import tables
from tests.conftest import ROOT


def test_no_committed_page_has_a_stale_benchmark_table():
    assert tables.stale() == [], "run `make docs` (python -m bench.tables --write) and commit the pages"


def test_a_changed_result_makes_its_page_stale(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copy(ROOT / "docs" / "benchmarks.md", tmp_path / "docs" / "benchmarks.md")
    results = tmp_path / "results"
    shutil.copytree(ROOT / "bench" / "results", results, ignore=shutil.ignore_patterns("*.gz"))
    monkeypatch.setattr(tables, "RESULTS", results)
    assert tables.stale(tmp_path) == []
    step = json.loads((results / "train_step.json").read_text())
    step["results"][0]["examples_per_s"] *= 2
    (results / "train_step.json").write_text(json.dumps(step))
    assert tables.stale(tmp_path) == ["docs/benchmarks.md"]
    page = tmp_path / "docs" / "benchmarks.md"
    page.write_text(tables.regenerated(page.read_text()))
    assert tables.stale(tmp_path) == []
