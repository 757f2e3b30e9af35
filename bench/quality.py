"""Quality on ML-1M (leave-one-out, full-corpus ranking, seen items filtered) plus the loss ablation.

    python -m bench.quality [--ml1m ../shared/datasets/ml-1m] [--prepared prepared/ml-1m]

Trains `configs/ml1m.yaml` as committed (in-batch + mixed negatives + logQ) and, on the same data with
the same epoch budget and early-stopping rule, two ablations: in-batch negatives only, and in-batch +
mixed negatives without logQ. Each run is a real `python -m trainer` job, tracked in MLflow like any
other. Writes bench/results/quality_ml1m.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {"SASRec": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474, "hr@200": 0.7528},
             "HSTU-large": {"hr@10": 0.3294, "ndcg@10": 0.1893}}
ABLATION = [
    ("in_batch_only", ["loader.num_negatives=0", "loss.logq=false"]),
    ("in_batch_plus_mixed", ["loss.logq=false"]),
    ("in_batch_plus_mixed_plus_logq", []),
]
REPORTED = ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "mrr", "coverage@10")


def run(config: Path, data: Path, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", "--config", str(config), f"data.path={data}", *overrides,
                        "--summary", str(summary)], cwd=ROOT, check=True)
        result = json.loads(summary.read_text())
    result["seconds"] = time.perf_counter() - start
    return result


def pick(metrics: dict) -> dict:
    return {k: round(metrics[k], 4) for k in REPORTED}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml1m", default=str(ROOT.parent / "shared" / "datasets" / "ml-1m"))
    parser.add_argument("--prepared", default=str(ROOT / "prepared" / "ml-1m"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "ml1m.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality_ml1m.json"))
    args = parser.parse_args()
    prepared = Path(args.prepared)
    if not (prepared / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "data.prepare", "movielens", args.ml1m, "--out", str(prepared),
                        "--max-history", "200", "--overwrite"], cwd=ROOT, check=True)
    started = time.perf_counter()
    rows = []
    for name, overrides in ABLATION:
        result = run(Path(args.config), prepared, overrides)
        rows.append({"name": name, "overrides": overrides, "best_epoch": result["best_epoch"],
                     "epochs_run": len(result["history"]), "seconds": round(result["seconds"], 1),
                     "run_id": result.get("run_id"), "test": pick(result["test"]), "valid": pick(result["valid"])})
        popularity = pick(result["popularity_test"])
    main_row = rows[-1]
    output = {
        "dataset": "ML-1M (../shared/datasets/ml-1m), leave-one-out, full corpus (3,706 items), seen filtered",
        "config": str(Path(args.config).relative_to(ROOT)),
        "machine": {"cpus": os.cpu_count()},
        "test": main_row["test"],
        "popularity_test": popularity,
        "published": PUBLISHED,
        "beats_sasrec_hr@10": main_row["test"]["hr@10"] > PUBLISHED["SASRec"]["hr@10"],
        "ablation": rows,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps({k: output[k] for k in ("test", "popularity_test", "beats_sasrec_hr@10", "total_seconds")},
                     indent=2))


if __name__ == "__main__":
    main()
