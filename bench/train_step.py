"""Training-step throughput: the TorchRec model against plain PyTorch, same towers, loss and batches.

    torchrec           DistributedModelParallel, fused rowwise Adagrad in the backward (Adam on GPU),
                       TrainPipelineSparseDist, dense Adam over the MLPs: what `python -m trainer` runs,
                       its loss with one logit column per distinct candidate item (loss.merge_duplicates)
    torchrec_unmerged  the same with loss.merge_duplicates=false: one column per candidate copy, as the
                       plain baselines compute it; the difference is what merging buys
    sparse_adam        nn.EmbeddingBag(sparse=True) + SparseAdam on the tables, fused Adam on the MLPs (as
                       the project's): what an expert writes in plain PyTorch
    dense_adam         nn.EmbeddingBag + one Adam over every parameter: the tutorials' way

A step is forward, loss (sampled softmax, in-batch + mixed negatives, logQ), backward and optimizer,
on B=1024 queries and 1024 sampled negatives, dim 64, history bags last-1/last-10/all over up to 50
Zipf-distributed items. Every (implementation, catalogue size) runs in a fresh subprocess, so its peak
RSS is its own; each runs `--warmup` steps, then times `--steps` steps and takes the median. Each
configuration runs in `--repeats` processes, interleaved across implementations; the table reports
the median of those.

    .venv/bin/python -m bench.train_step [--sizes 10000 100000 1000000 10000000] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import towers
from bench.common import machine, peak_rss_mib
from config import JobConfig, load_config
from data import schema
from data.batch import TrainBatch, make_kjt
from data.keys import QueryLayout, candidate_keys
from data.negatives import Negatives
from towers.shared import kjt_features
from trainer.loss.modules import RetrievalLoss, build_loss

ROOT = Path(__file__).resolve().parents[1]

IMPLS = ("torchrec", "torchrec_unmerged", "sparse_adam", "dense_adam")
MAX_HISTORY = 50
ZIPF = 1.0


def catalogue_meta(num_items: int) -> schema.Metadata:
    return schema.Metadata(schema_version=schema.SCHEMA_VERSION, source={"kind": "benchmark"}, split={}, filters={},
                           max_history=MAX_HISTORY, num_users=0, num_items=num_items, counts={})


def popularity(num_items: int) -> np.ndarray:
    """Zipf(1) item probabilities over ids 1..N; index 0 is the pad id."""
    p = np.r_[0.0, 1.0 / np.arange(1, num_items + 1) ** ZIPF]
    return p / p.sum()


def batches(cfg: JobConfig, meta: schema.Metadata, probs: np.ndarray, count: int,
            seed: int) -> tuple[list[TrainBatch], Negatives]:
    """`count` distinct batches, as the loader would build them (stride B + S, negatives from the sampler):
    the query through the same `QueryLayout` the loader and serving use."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(probs)
    draw = lambda n: np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"),
                                meta.num_items).astype(np.int64)
    negatives = Negatives.of(cfg.negatives, counts(probs))
    layout = QueryLayout.for_data(meta, cfg.loader.history_bags, cfg.loader.use_user_id)
    b, s = cfg.loader.batch_size, negatives.num_sampled
    out = []
    for _ in range(count):
        lengths = rng.integers(1, MAX_HISTORY + 1, b)
        history = (np.r_[0, np.cumsum(lengths)], draw(int(lengths.sum())))
        queries = layout.arrays(history, np.zeros(b, dtype=np.int64), {}, np.arange(b))
        arrays = [(np.r_[bag, np.zeros(s, dtype=np.int64)], values) for bag, values in queries]
        candidates = np.r_[draw(b), negatives.sample(rng)]
        arrays.append((np.ones(b + s, dtype=np.int64), candidates))
        out.append(TrainBatch(sparse=make_kjt(layout.keys + candidate_keys([]), arrays),
                              candidate_ids=torch.from_numpy(candidates), row_mask=torch.ones(b, dtype=torch.bool)))
    return out, negatives


def counts(probs: np.ndarray) -> np.ndarray:
    """Training counts with the popularity `probs` (every real item seen at least once)."""
    return (probs * 1e9).astype(np.int64) + (np.arange(len(probs)) > 0)


def loss_module(cfg: JobConfig, probs: np.ndarray, negatives: Negatives) -> RetrievalLoss:
    """The trainer's loss (trainer/loss/modules.py:build_loss), one column per copy as plain PyTorch would."""
    return build_loss(cfg, negatives, counts(probs), sequence=False, merge=False, precision="fp32")


def torchrec_step(cfg: JobConfig, meta: schema.Metadata, probs: np.ndarray, negatives: Negatives):
    from trainer import distributed
    from trainer.assembly import build_model

    env = distributed.init("auto")
    model = build_model(cfg, env, meta, counts(probs), negatives)

    def step(stream) -> None:
        model.pipeline.progress(stream)

    return step, (f"fused rowwise_adagrad (tables) + adam (MLPs), TrainPipelineSparseDist, "
                  f"loss.merge_duplicates={str(cfg.loss.merge_duplicates).lower()}")


def plain_step(cfg: JobConfig, meta: schema.Metadata, probs: np.ndarray, negatives: Negatives, sparse: bool):
    plain = towers.of(cfg).plain(meta, cfg, sparse=sparse)
    loss_fn = loss_module(cfg, probs, negatives)
    tables = list(plain.tables.parameters())
    dense = [p for name, p in plain.named_parameters() if not name.startswith("tables.")]
    if sparse:
        lr = cfg.optim.dense_lr
        optimizers = [torch.optim.SparseAdam(tables, lr=lr), torch.optim.Adam(dense, lr=lr, fused=True)]
        name = "SparseAdam (tables) + fused adam (MLPs)"
    else:
        optimizers = [torch.optim.Adam(plain.parameters(), lr=cfg.optim.dense_lr)]
        name = "adam over all parameters"

    def step(stream) -> None:
        batch = next(stream)
        query, candidates = plain.towers(kjt_features(batch.sparse), batch.batch_size)
        loss = loss_fn(query, candidates, batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()

    return step, name


def worker(impl: str, items: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = load_config(None, ["tracking.enabled=false", "loader.history_bags=[1, 10, 0]"]
                      + (["loss.merge_duplicates=false"] if impl == "torchrec_unmerged" else []))
    meta = catalogue_meta(items)
    probs = popularity(items)
    data, negatives = batches(cfg, meta, probs, warmup + steps + 2, seed=0)  # the pipeline reads ahead
    rss_before = peak_rss_mib()
    if impl.startswith("torchrec"):
        step, optimizer = torchrec_step(cfg, meta, probs, negatives)
    else:
        step, optimizer = plain_step(cfg, meta, probs, negatives, sparse=impl == "sparse_adam")
    stream = iter(data)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(stream)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"impl": impl, "items": items, "optimizer": optimizer, "examples_per_s": cfg.loader.batch_size / median,
            "step_ms_median": 1000 * median, "step_ms": [1000 * t for t in times],
            "peak_rss_mib": peak_rss_mib(), "batches_rss_mib": rss_before}


def run_worker(impl: str, items: int, warmup: int, steps: int) -> dict:
    if impl == "dense_adam" and items >= 10**7:
        # Dense Adam rewrites all 10^7 rows and their two moments every step (~10 s here): a few steps suffice.
        warmup, steps = min(warmup, 2), min(steps, 3)
    out = subprocess.run([sys.executable, "-m", "bench.train_step", "--worker", impl, "--items", str(items),
                          "--warmup", str(warmup), "--steps", str(steps)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{impl} at {items} items failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per (implementation, size)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_step.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.items, args.warmup, args.steps)))
        return
    rows = []
    for items in args.sizes:
        runs: dict[str, list[dict]] = {impl: [] for impl in args.impls}
        for _ in range(args.repeats):
            for impl in args.impls:  # interleaved, so drift on the machine hits every implementation alike
                runs[impl].append(run_worker(impl, items, args.warmup, args.steps))
        for impl, done in runs.items():
            speeds = [r["examples_per_s"] for r in done]
            row = {"impl": impl, "items": items, "optimizer": done[0]["optimizer"],
                   "examples_per_s": statistics.median(speeds), "examples_per_s_runs": speeds,
                   "step_ms_median": statistics.median(r["step_ms_median"] for r in done),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in done), "steps_per_run": len(done[0]["step_ms"])}
            rows.append(row)
            print(f"{items:>10,} items  {impl:<12} {row['examples_per_s']:>9,.0f} ex/s "
                  f"(runs {', '.join(f'{v:,.0f}' for v in speeds)})  peak RSS {row['peak_rss_mib']:8,.0f} MiB",
                  flush=True)
    speed = {(r["impl"], r["items"]): r["examples_per_s"] for r in rows}
    ratios = {str(items): {f"torchrec_over_{impl}": speed["torchrec", items] / speed[impl, items]
                           for impl in args.impls if impl != "torchrec" and ("torchrec", items) in speed}
              for items in args.sizes}
    result = {"machine": machine(),
              "setup": {"batch_size": 1024, "negatives": 1024, "dim": 64, "history_bags": [1, 10, 0],
                        "max_history": MAX_HISTORY, "popularity": f"zipf({ZIPF})", "hidden_dims": [256],
                        "warmup_steps": args.warmup, "steps": args.steps, "repeats": args.repeats,
                        "timing": "per process: median step time after warm-up; reported: the median over "
                                  "`repeats` fresh processes, run interleaved across implementations"},
              "results": rows, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
