"""Scaling: training examples/s with 1 and 2 processes (gloo, CPU) on the synthetic default set.

    python -m bench.scaling [--runs 3] [--max-steps 120]

Each run is a real job: `python -m trainer` for 1 process, `torchrun --nproc_per_node 2 -m trainer`
for 2, both with configs/synthetic.yaml and a fixed global batch per process. Throughput is the
trainer's own median over its logging windows (first window, with pipeline fill, left out); we
report the median over runs, the plan each world size chose, and the 2-over-1 ratio.
Writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(world: int, data: Path, max_steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       "--standalone", "--nproc_per_node", str(world)]
        subprocess.run([*launcher, "-m", "trainer", "--config", "configs/synthetic.yaml", f"data.path={data}",
                        "train.epochs=1", f"train.max_steps={max_steps}", "train.log_every=10",
                        "tracking.enabled=false", "eval.popularity_baseline=false", "--summary", str(summary)],
                       cwd=ROOT, check=True, capture_output=True)
        return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=100, help="steps per run (each step: 1024 per process)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "two-tower-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaling.json"))
    args = parser.parse_args()
    data = Path(args.workdir) / "synthetic-6000"
    if not (data / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "data.prepare", "synthetic", "--out", str(data), "--overwrite"],
                       cwd=ROOT, check=True, capture_output=True)
    result = {"machine": {"cpus": os.cpu_count()},
              "setup": {"config": "configs/synthetic.yaml", "batch_per_process": 1024, "negatives": 1024,
                        "runs": args.runs, "max_steps": args.max_steps, "backend": "gloo"}}
    for world in (1, 2):
        runs = [run(world, data, args.max_steps) for _ in range(args.runs)]
        samples = [r["train_examples_per_s"] for r in runs]
        result[f"world_{world}"] = {"examples_per_s_median": statistics.median(samples), "examples_per_s_runs": samples,
                                    "sharding_plan": {k: {"sharding_type": v["sharding_type"],
                                                          "ranks": sorted({s.get("rank", -1) for s in v["shards"]})}
                                                      for k, v in runs[0]["sharding_plan"].items()}}
    result["ratio_2_over_1"] = result["world_2"]["examples_per_s_median"] / result["world_1"]["examples_per_s_median"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"1 process {result['world_1']['examples_per_s_median']:,.0f} ex/s, 2 processes "
          f"{result['world_2']['examples_per_s_median']:,.0f} ex/s (x{result['ratio_2_over_1']:.2f}) -> {args.out}")


if __name__ == "__main__":
    main()
