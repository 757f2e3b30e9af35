"""Serving latency of one query (query tower + index search + seen-item filtering), per export.

    python -m bench.serving_latency --export NAME=DIR [NAME=DIR ...] [--queries 1000] [--repeats 3]

Each export is measured in `--repeats` fresh processes, interleaved (A, B, A, B, ...): in each, `Recommender`
loads the export as `serving.recommend` does, answers 50 warm-up queries, then times `--queries` single
queries (top 10) whose raw histories are the prepared validation split's, one at a time as a server would.
Reported: p50 and p99 per process, and their median over the processes, in bench/results/serving_latency.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import machine

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 50


def measure(export: str, queries: int) -> dict:
    """In this process: p50/p99 milliseconds of `queries` single-query recommendations."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from serving.model import ExportedModel
    from serving.recommend import Recommender

    torch.set_num_threads(1)  # one query per request, as a serving worker runs it
    model = ExportedModel(export)
    recommender = Recommender(model)
    manifest = json.loads((Path(export) / "export.json").read_text())
    data = Path(manifest["source"]["data"])
    raw_of = dict(zip(pq.read_table(data / "items.parquet").column("item").to_pylist(),
                      map(str, pq.read_table(data / "items.parquet").column("raw_id").to_pylist())))
    rows = pq.read_table(data / "valid", columns=["history"]).slice(0, WARMUP + queries)
    histories = [[raw_of[i] for i in h] for h in rows.column("history").to_pylist()]
    for history in histories[:WARMUP]:
        recommender.recommend(history, {}, k=10)
    times = []
    for history in histories[WARMUP:]:
        start = time.perf_counter()
        recommender.recommend(history, {}, k=10)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "queries": len(times), "mean_history": float(np.mean([len(h) for h in histories[WARMUP:]])),
            "tower": model.manifest.query_tower.kind, "index": model.manifest.index["kind"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", nargs="+", required=True, help="NAME=DIR of each export to measure")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_latency.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.queries)))
        return 0
    exports = dict(item.split("=", 1) for item in args.export)
    runs: dict[str, list[dict]] = {name: [] for name in exports}
    for _ in range(args.repeats):
        for name, directory in exports.items():
            out = subprocess.run([sys.executable, "-m", "bench.serving_latency", "--export", "x=x", "--child",
                                  directory, "--queries", str(args.queries)], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name}: p50 {runs[name][-1]['p50_ms']:.2f} ms, p99 {runs[name][-1]['p99_ms']:.2f} ms")
    results = {name: {"p50_ms": statistics.median(r["p50_ms"] for r in rs),
                      "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                      "tower": rs[0]["tower"], "index": rs[0]["index"], "queries": rs[0]["queries"],
                      "mean_history": rs[0]["mean_history"], "export": exports[name], "runs": rs}
               for name, rs in runs.items()}
    Path(args.out).write_text(json.dumps({"machine": machine(), "threads": 1, "repeats": args.repeats,
                                          "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
