"""Does the committed sequence recipe win on short histories, as most users' data is? Four datasets, each
prepared the way a user would (`python -m data.prepare`), and five recipes with only `data.path`
changed, several seeds each:

    python -m bench.short_history [--datasets games ml1m-short ml1m] [--recipes ...] [--seeds 0 1 2] [--jobs 2]

Datasets:
- `games`: the development set, Amazon video-game reviews as SASRec's authors prepared them (29k users after the
  5-event filter, 23k items, 9.6 events a user, no features), from ../shared/datasets/amazon-games;
- `ml1m-short`: every ML-1M user cut to their last n events, n = 5 + Geometric(1/6) capped at 50 (mean about 10,
  like the held-out review sets), genres as item attributes;
- `ml1m`: ML-1M's full histories (165 events a user), for contrast;
- `ml100k`: MovieLens 100K as `python -m data.prepare movielens` reads it (106 events a user), the one set here
  with event times: HSTU's time-gap bias against positions only.

Recipes:
- `bag-tower`: configs/ml1m.yaml (the bag tower);
- `sequences`: configs/sequences.yaml, the transformer's short-history recipe;
- `sequences-previous`: configs/sequences.yaml with the overrides in PREVIOUS, the recipe before it;
- `ml1m-hstu-config`: configs/ml1m_hstu.yaml (the HSTU tower) as committed, the way the held-out sets are rerun
  with it (only `data.path` changed);
- `ml1m-hstu-positions`: the same without the time-gap bias (`model.tower.time_gaps=false`), which only changes
  anything on data with event times.

Every run is a fresh `python -m trainer` process with OMP_NUM_THREADS=1; `--jobs 2` runs two at a time on the
two cores. Results (test and best-validation metrics, epochs, wall seconds per run, and the means over seeds)
are merged into bench/results/short_history.json, so a partial rerun keeps the other entries.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.common import machine

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("TWO_TOWER_DATASETS", ROOT.parent / "shared" / "datasets"))
REPORTED = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr", "coverage@10")
# The transformer recipe of configs/sequences.yaml before the short-history work (issue 33), as overrides.
PREVIOUS = ["loader.history_bags=[1,10,0]", "model.hidden_dims=[]", "loss.temperature=0.05"]
RECIPES = {"bag-tower": ("configs/ml1m.yaml", []), "sequences": ("configs/sequences.yaml", []),
           "sequences-previous": ("configs/sequences.yaml", PREVIOUS),
           "ml1m-hstu-config": ("configs/ml1m_hstu.yaml", []),
           "ml1m-hstu-positions": ("configs/ml1m_hstu.yaml", ["model.tower.time_gaps=false"])}


def write_ml1m_short(ml1m: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A sequence file of each ML-1M user's last n events and a genre attribute JSON."""
    rng = np.random.default_rng(seed)
    lines = []
    with gzip.open(ml1m / "sequences.txt.gz", "rt") as f:
        for line in f:
            user, *items = line.split()
            n = min(len(items), 50, 5 + int(rng.geometric(1 / 6)) - 1)
            lines.append(" ".join([user, *items[-n:]]))
    sequences = out / "ml1m_short.txt"
    sequences.write_text("\n".join(lines) + "\n")
    attributes = out / "ml1m_short_attributes.json"
    attributes.write_text(json.dumps(movie_genres(ml1m)))
    return sequences, attributes


def movie_genres(ml1m: Path) -> dict[str, list[str]]:
    genres = {}
    for line in (ml1m / "movies.dat").read_text(encoding="latin-1").splitlines():
        movie, _, names = line.split("::")
        genres[movie] = names.split("|")
    return genres


def prepare_args(name: str, tmp: Path) -> list[str]:
    """`python -m data.prepare` arguments of a dataset, as a user would prepare it."""
    if name == "games":
        return ["sequences", str(DATASETS / "amazon-games" / "sequences.txt.gz")]
    if name == "ml100k":
        return ["movielens", str(DATASETS / "ml-100k"), "--max-history", "200"]
    ml1m = DATASETS / "ml-1m"
    if name == "ml1m-short":
        sequences, attributes = write_ml1m_short(ml1m, tmp)
        return ["sequences", str(sequences), "--item-attributes", str(attributes)]
    attributes = tmp / "ml1m_attributes.json"
    attributes.write_text(json.dumps(movie_genres(ml1m)))
    return ["sequences", str(ml1m / "sequences.txt.gz"), "--item-attributes", str(attributes), "--max-history", "200"]


def source(name: str) -> Path:
    """The licensed file a dataset is made from (read from ../shared/datasets or $TWO_TOWER_DATASETS, never shipped)."""
    if name == "ml100k":
        return DATASETS / "ml-100k" / "u.data"
    return DATASETS / ("amazon-games" if name == "games" else "ml-1m") / "sequences.txt.gz"


def prepare(name: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "data.prepare", *prepare_args(name, Path(tmp)), "--out", str(out),
                        "--overwrite"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def train(recipe: str, data: Path, seed: int, tracking: str) -> dict:
    config, overrides = RECIPES[recipe]
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        env = os.environ | {"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "trainer", "--config", config, f"data.path={data}",
                               f"seed={seed}", "export.enabled=false", *overrides, "--summary", str(summary)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{recipe} on {data} (seed {seed}) failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        result = json.loads(summary.read_text())
    best = next(h for h in result["history"] if h["epoch"] == result["best_epoch"])
    return {"seed": seed, "best_epoch": result["best_epoch"], "epochs_run": len(result["history"]),
            "seconds": round(time.perf_counter() - start, 1), "run_id": result.get("run_id"),
            "valid": {k: round(best[k], 4) for k in REPORTED if k in best},
            "test": {k: round(result["test"][k], 4) for k in REPORTED},
            "popularity_test": {k: round(result["popularity_test"][k], 4) for k in REPORTED}}


def summarise(runs: list[dict]) -> dict:
    """Means over seeds of the test metrics, the wall time and the best epoch."""
    return {"seeds": sorted(r["seed"] for r in runs),
            "test_mean": {k: round(float(np.mean([r["test"][k] for r in runs])), 4) for k in REPORTED},
            "test_std": {k: round(float(np.std([r["test"][k] for r in runs])), 4) for k in ("hr@10", "ndcg@10")},
            "seconds_mean": round(float(np.mean([r["seconds"] for r in runs])), 1),
            "seconds_max": max(r["seconds"] for r in runs),
            "best_epoch_mean": round(float(np.mean([r["best_epoch"] for r in runs])), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=["games", "ml1m-short", "ml1m", "ml100k"],
                        default=["games", "ml1m-short"])
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--prepared", default=str(ROOT / "prepared"))
    parser.add_argument("--tracking", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "short_history.json"))
    args = parser.parse_args()
    out = Path(args.out)
    output = json.loads(out.read_text()) if out.exists() else {}
    if "datasets" in output and "protocol" not in output:
        output = {}  # the layout before issue 33 (one seed, no recipes): not comparable
    output.update(machine=machine(), previous_overrides=PREVIOUS, protocol=(
        "leave-one-out, full catalogue, seen items filtered; test metrics of the best-validation epoch; "
        f"{args.jobs} runs at a time, one thread each"))
    results = output.setdefault("datasets", {})
    for name in args.datasets:
        data = Path(args.prepared) / f"short-history-{name}"
        if not (data / "metadata.json").exists():
            if not source(name).exists():
                print(f"skipping {name}: {source(name)} not found (licensed data is read from ../shared/datasets or "
                      f"$TWO_TOWER_DATASETS, never shipped)", file=sys.stderr)
                continue
            prepare(name, data)
        meta = json.loads((data / "metadata.json").read_text())
        entry = results.setdefault(name, {})
        entry["data"] = {"users": meta["num_users"], "items": meta["num_items"],
                         "train_examples": meta["counts"]["train_examples"],
                         "events_per_user": round(meta["counts"]["events"] / meta["num_users"], 1)}
        work = [(recipe, seed) for recipe in args.recipes for seed in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            done = pool.map(lambda rs, data=data: (rs[0], train(rs[0], data, rs[1], args.tracking)), work)
            for recipe, run in done:
                config, overrides = RECIPES[recipe]
                record = entry.setdefault(recipe, {"config": config, "overrides": overrides, "runs": []})
                record.update(config=config, overrides=overrides)
                record["runs"] = sorted([r for r in record["runs"] if r["seed"] != run["seed"]] + [run],
                                        key=lambda r: r["seed"])
                record["summary"] = summarise(record["runs"])
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(output, indent=2) + "\n")
                print(f"{name} {recipe} seed {run['seed']}: test {run['test']['hr@10']:.4f} / "
                      f"{run['test']['ndcg@10']:.4f}, best epoch {run['best_epoch']}, {run['seconds']:.0f} s",
                      flush=True)
    for name, entry in results.items():
        for recipe in RECIPES:
            if recipe in entry:
                mean = entry[recipe]["summary"]["test_mean"]
                print(f"{name:11s} {recipe:19s} HR@10 {mean['hr@10']:.4f} NDCG@10 {mean['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
