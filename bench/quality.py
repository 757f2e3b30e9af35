"""Quality on ML-1M (leave-one-out, full-corpus ranking, seen items filtered): every query tower, each with
the loss ablation.

    python -m bench.quality [--towers bags transformer] [--runs NAME ...] [--seeds N] [--jobs N] [--ml1m DIR]
                            [--prepared DIR] [--note TEXT] [--blocks N ...] [--variant NAME KEY=VALUE ...]

For each tower, its committed config (`configs/ml1m.yaml` for the bags, `configs/ml1m_transformer.yaml` for the
transformer, `configs/ml1m_hstu.yaml` for HSTU) is trained as committed (in-batch + mixed negatives + logQ) and, on
the same data with the same epoch budget and early-stopping rule, with two ablations: in-batch negatives only, and
in-batch + mixed negatives without logQ. Each run is a real `python -m trainer` job in a fresh process, tracked in
MLflow like any other, with its wall time. `--seeds N` also trains the committed config with seeds 1 .. N-1 and
records the spread of the test metrics over the N seeds: what a difference between two runs must exceed to
mean anything. Results go to bench/results/quality_ml1m.json; a run already there is kept unless named with
--runs, so the runs (hours on 2 CPU cores) can be spread over several invocations. `--jobs N` trains N runs at
a time, each with cores / N threads: on 2 cores two one-thread runs take about 45 minutes where one after the
other took 80; each such row says so in its `note`, since its wall time is then not a measurement alone.
`--blocks N ...` trains only the named sequence towers' committed configs with `model.tower.blocks=N` (seed 0),
into the tower's `depths`: how deep a stack trains to early stopping, and in how long, here.
`--variant NAME KEY=VALUE ...` trains only the named towers' committed configs with those overrides (seed 0), into
the tower's `variants[NAME]`: for example a faster step (`train.precision=bf16 loader.bucket_by_length=true`)
against the committed run's test metrics and wall time, same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import machine, tower_configs

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ("configs/ml1m.yaml", "configs/ml1m_transformer.yaml", "configs/ml1m_hstu.yaml")  # one per query tower

CONFIGS = tower_configs(COMMITTED)
# The published rows on the same protocol (issue 14 and ../shared/datasets/README.md).
PUBLISHED = {
    "SASRec (generative-recommenders README)": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474,
                                                "hr@200": 0.7528},
    "SASRec, sampled softmax, 256 negatives (eSASRec paper)": {"hr@10": 0.2929, "ndcg@10": 0.1684},
    "eSASRec (eSASRec paper)": {"hr@10": 0.3133, "ndcg@10": 0.1772},
    "SASRec, full cross-entropy (Klenitskiy & Vasilev 2023)": {"hr@10": 0.3152, "ndcg@10": 0.1821},
    "SASRec, 3,000 negatives (Klenitskiy & Vasilev 2023)": {"hr@10": 0.3159, "ndcg@10": 0.1857},
    "HSTU-large (generative-recommenders README)": {"hr@10": 0.3294, "ndcg@10": 0.1893},
    "HSTU, full softmax, re-implementation (HSTU-Tensorflow README)": {"hr@10": 0.3419, "ndcg@10": 0.1944},
}
ABLATION = [
    ("in_batch_only", ["negatives.kind=in_batch", "loss.logq=false"]),
    ("in_batch_plus_mixed", ["loss.logq=false"]),
    ("in_batch_plus_mixed_plus_logq", []),
]
COMMITTED = ABLATION[-1][0]
REPORTED = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "mrr", "coverage@10")


def run(config: str, data: Path, overrides: list[str], threads: int | None = None) -> dict:
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", "--config", config, f"data.path={data}", *overrides,
                        "--summary", str(summary)], cwd=ROOT, check=True, env=env)
        result = json.loads(summary.read_text())
    result["seconds"] = time.perf_counter() - start
    return result


def pick(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in REPORTED}


def row(name: str, overrides: list[str], result: dict, note: str | None = None) -> dict:
    """One run's entry. `note` says how its wall time was measured when not alone on the machine."""
    return {"name": name, "overrides": overrides, "best_epoch": result["best_epoch"],
            "epochs_run": len(result["history"]), "steps": result["steps"], "seconds": round(result["seconds"], 1),
            "train_examples_per_s": round(result["train_examples_per_s"], 1), "run_id": result.get("run_id"),
            "test": pick(result["test"]), "valid": pick(result["valid"]),
            "valid_history": [{k: round(h[k], 4) for k in ("epoch", "lr_scale", "hr@10", "ndcg@10")}
                              for h in result["history"]],
            "popularity_test": pick(result["popularity_test"])} | ({"note": note} if note else {})


def threads(jobs: int) -> int | None:
    """Threads per run: the cores shared out, or the trainer's own choice when one run has the machine."""
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def seed_spread(tests: list[dict]) -> dict:
    return {k: {"mean": round(statistics.mean(t[k] for t in tests), 4),
                "stdev": round(statistics.stdev(t[k] for t in tests), 4),
                "min": min(t[k] for t in tests), "max": max(t[k] for t in tests)}
            for k in ("hr@10", "ndcg@10")} | {"seeds": len(tests)}


def save(output: dict, out: Path) -> None:
    """After every run: hours of work are never lost to a later failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml1m", default=str(ROOT.parent / "shared" / "datasets" / "ml-1m"))
    parser.add_argument("--prepared", default=str(ROOT / "prepared" / "ml-1m"))
    parser.add_argument("--towers", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--runs", nargs="+", choices=[name for name, _ in ABLATION], default=None,
                        help="rerun these (default: every run not yet in the results file)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds of the committed config (default: 1, seed 0)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at a time (default 1)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_ml1m.json"))
    parser.add_argument("--note", help="recorded with each run of this invocation, e.g. that it shared the cores")
    parser.add_argument("--blocks", nargs="+", type=int, default=[],
                        help="only train the committed config with these stack depths (sequence towers)")
    parser.add_argument("--variant", nargs="+", metavar="NAME KEY=VALUE",
                        help="only train the committed config with these overrides, recorded as variants[NAME]")
    args = parser.parse_args()
    if args.variant and (len(args.variant) < 2 or "=" in args.variant[0]):
        parser.error("--variant takes a name and then one or more KEY=VALUE overrides")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    prepared, out = Path(args.prepared), Path(args.out)
    if not (prepared / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "data.prepare", "movielens", args.ml1m, "--out", str(prepared),
                        "--max-history", "200", "--overwrite"], cwd=ROOT, check=True)
    output = json.loads(out.read_text()) if out.exists() else {}
    if "towers" not in output:  # a results file from before the transformer tower: start afresh
        output = {}
    output.update({"dataset": "ML-1M (../shared/datasets/ml-1m), leave-one-out, full corpus (3,706 items), "
                              "seen filtered", "machine": machine(), "published": PUBLISHED})
    towers = output.setdefault("towers", {})
    tasks = []  # (tower, name, seed, overrides): the committed runs first, as the headline
    for tower in args.towers:
        entry = towers.setdefault(tower, {"config": CONFIGS[tower], "ablation": {}})
        entry["config"] = CONFIGS[tower]
        for name, overrides in sorted(ABLATION, key=lambda run: run[0] != COMMITTED):
            if (name in args.runs) if args.runs else (name not in entry["ablation"]):
                tasks.append((tower, name, 0, overrides))
                if name == COMMITTED:  # its other seeds belong to the run they were measured beside
                    entry.pop("seeds", None), entry.pop("seed_spread", None)
        seeds = entry.setdefault("seeds", {})
        tasks += [(tower, COMMITTED, seed, [f"seed={seed}"]) for seed in range(1, args.seeds) if str(seed) not in seeds]
    if args.blocks:
        tasks = [(tower, f"blocks={n}", 0, [f"model.tower.blocks={n}"]) for tower in args.towers for n in args.blocks]
    if args.variant:
        tasks = [(tower, f"variant={args.variant[0]}", 0, args.variant[1:]) for tower in args.towers]
    note = " ".join(filter(None, [args.note, f"{args.jobs} runs at a time, {threads(args.jobs)} thread(s) each"
                                  if args.jobs > 1 else None])) or None
    saving = threading.Lock()

    def train(task: tuple) -> None:
        tower, name, seed, overrides = task
        result = row(name, overrides, run(CONFIGS[tower], prepared, overrides, threads(args.jobs)), note)
        with saving:
            entry = towers[tower]
            if name.startswith("blocks="):
                entry.setdefault("depths", {})[name.removeprefix("blocks=")] = result
            elif name.startswith("variant="):
                entry.setdefault("variants", {})[name.removeprefix("variant=")] = result
            elif seed:
                entry["seeds"][str(seed)] = result
            else:
                entry["ablation"][name] = result
                if name == COMMITTED:
                    entry["test"] = result["test"]
                    output["popularity_test"] = result["popularity_test"]
            save(output, out)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(train, tasks))  # a failed run raises here, once the others have ended and been saved
    for entry in towers.values():
        if entry.get("seeds") and COMMITTED in entry["ablation"]:
            entry["seed_spread"] = seed_spread([entry["ablation"][COMMITTED]["test"]]
                                               + [r["test"] for r in entry["seeds"].values()])
    save(output, out)
    print(json.dumps({tower: entry.get("test") for tower, entry in towers.items()}, indent=2))


if __name__ == "__main__":
    main()
