"""A partial rerun of the sequence-step benchmark keeps what it did not measure, dated."""

from bench.sequence_step import kept_rows


def results_file() -> dict:
    step = [{"tower": t, "impl": "torchrec", "items": 10_000, "positions_per_s": 1.0} for t in ("transformer", "hstu")]
    epoch = [{"tower": t, "impl": "torchrec", "seconds": 1.0} for t in ("transformer", "hstu", "bags")]
    return {"machine": {"date": "2026-12-07"}, "results": step, "epoch": epoch,
            "ratios": {"transformer": {"10000": {}}, "hstu": {"10000": {}}},
            "setup": {"towers": {"transformer": {"hidden_dims": [512]}, "hstu": {"hidden_dims": [512]}}},
            "profile": {"tower": "transformer", "items": 10**6, "top_ops": []}}


def test_a_rerun_of_one_tower_keeps_the_others_rows_dated_and_drops_its_own():
    kept = kept_rows(results_file(), ["transformer"], ["transformer"])
    assert [(r["tower"], r["measured"]) for r in kept["results"]] == [("hstu", "2026-12-07")]
    assert [(r["tower"], r["measured"]) for r in kept["epoch"]] == [("hstu", "2026-12-07"), ("bags", "2026-12-07")]
    assert list(kept["ratios"]) == ["hstu"] and list(kept["setup"]) == ["hstu"]
    assert kept["profile"]["measured"] == "2026-12-07"


def test_without_epochs_every_epoch_row_is_kept_and_an_earlier_date_is_not_overwritten():
    before = results_file()
    before["epoch"][1]["measured"] = "2026-12-02"
    kept = kept_rows(before, ["transformer", "hstu"], [])
    assert kept["results"] == [] and kept["ratios"] == {}
    assert [r["measured"] for r in kept["epoch"]] == ["2026-12-07", "2026-12-02", "2026-12-07"]


def test_a_first_run_keeps_nothing():
    assert kept_rows({}, ["transformer"], ["transformer"]) == {"results": [], "ratios": {}, "epoch": [],
                                                              "profile": None, "setup": {}}
