"""Validation time of the sequence towers: evaluation queries in file order against ordered by history length
(data/loader.py:SequenceEvalLoader), on ML-1M with each tower's committed config.

    .venv/bin/python -m bench.evaluation [--prepared prepared/ml-1m] [--repeats 3] [--ml1m DIR]

`--prepared` is prepared from `--ml1m` (../shared/datasets/ml-1m) first when it holds no dataset, as
bench/quality.py prepares it.

Each (tower, order) runs in a fresh process: the job is built, then one validation pass is timed (the catalogue's
candidate embeddings, every query, the full-catalogue ranking and the metrics), with an untrained model, whose cost
is a trained one's. Processes run interleaved across orders; the table reports the median and the ratio, and each
order's metrics, which must agree (they differ only by float rounding where a batch's shape changes a query's last
bits). Results go to bench/results/evaluation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine, peak_rss_mib, tower_configs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = tower_configs(("configs/ml1m_transformer.yaml", "configs/ml1m_hstu.yaml"))
ORDERS = ("file", "length")
REPORTED = ("hr@10", "ndcg@10", "mrr")


def worker(config: str, order: str, prepared: str) -> dict:
    import numpy as np
    import torch

    from config import load_config
    from data.loader import SequenceEvalLoader
    from trainer import distributed
    from trainer.evaluate import evaluate
    from trainer.loop import build

    if order == "file":
        SequenceEvalLoader.row_order = lambda self, block, rng: np.arange(block.n)
    cfg = load_config(ROOT / config, [f"data.path={prepared}", "tracking.enabled=false", "export.enabled=false"])
    job = build(cfg, distributed.init("cpu"))
    job.model.dmp.eval()
    device = torch.device("cpu")
    loader = job.data.eval_loaders["valid"]
    padding = [batch.sequence.lengths()[:batch.batch_size] for batch in loader.epoch(0)]
    computed = sum(len(lengths) * max(int(lengths.max()), 1) for lengths in padding)
    start = time.perf_counter()
    metrics = evaluate(job.model.scorer(job.data, device), loader.epoch(0), cfg.eval.ks, job.data.meta.num_items,
                       device)
    return {"seconds": time.perf_counter() - start, "queries": int(metrics["users"]),
            "padding_share": 1 - sum(int(lengths.sum()) for lengths in padding) / computed,
            "metrics": {k: metrics[k] for k in REPORTED}, "peak_rss_mib": peak_rss_mib()}


def run(tower: str, order: str, prepared: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.evaluation", "--worker", order, "--tower", tower,
                          "--prepared", prepared], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{tower} in {order} order failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default=str(ROOT / "prepared" / "ml-1m"))
    parser.add_argument("--ml1m", default=str(ROOT.parent / "shared" / "datasets" / "ml-1m"))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per (tower, order)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "evaluation.json"))
    parser.add_argument("--worker", choices=ORDERS, help=argparse.SUPPRESS)
    parser.add_argument("--tower", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(CONFIGS[args.tower], args.worker, args.prepared)))
        return
    if not (Path(args.prepared) / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "data.prepare", "movielens", args.ml1m, "--out", args.prepared,
                        "--max-history", "200", "--overwrite"], cwd=ROOT, check=True)
    rows = []
    for tower in CONFIGS:
        runs: dict[str, list[dict]] = {order: [] for order in ORDERS}
        for _ in range(args.repeats):
            for order in ORDERS:  # interleaved, so drift on the machine hits both orders alike
                runs[order].append(run(tower, order, args.prepared))
        for order, done in runs.items():
            rows.append({"tower": tower, "config": CONFIGS[tower], "order": order,
                         "seconds": statistics.median(r["seconds"] for r in done),
                         "seconds_runs": [round(r["seconds"], 2) for r in done],
                         "padding_share": done[0]["padding_share"], "queries": done[0]["queries"],
                         "metrics": done[0]["metrics"], "peak_rss_mib": max(r["peak_rss_mib"] for r in done)})
            print(f"{tower:<12} {order:<7} {rows[-1]['seconds']:6.1f} s  padding {rows[-1]['padding_share']:.0%}",
                  flush=True)
    seconds = {(r["tower"], r["order"]): r["seconds"] for r in rows}
    result = {"machine": machine(), "prepared": args.prepared, "repeats": args.repeats, "results": rows,
              "speedup": {tower: seconds[tower, "file"] / seconds[tower, "length"] for tower in CONFIGS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["speedup"], indent=2))


if __name__ == "__main__":
    main()
