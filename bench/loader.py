"""Loader benchmark: our pipelined loader against the tutorials' map-style Dataset + collate_fn.

    python -m bench.loader [--ml1m ../shared/datasets/ml-1m] [--runs 5] [--batches 150]

- Throughput on prepared ML-1M, batch 1024 with 1024 mixed negatives (unigram^0.75), both loaders
  in the same run, one warm-up each, then `--runs` timed runs; median reported. Our loader is timed
  over whole epochs (start-up and row-group reads included); the naive one over `--batches`
  batches, with its dataset construction left out of its time (both favour the naive loader).
- Peak RSS while streaming one whole epoch of the synthetic set at 1x and 10x the users (same
  catalogue), each in a fresh process so peaks do not mix.
Writes bench/results/loader.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from bench.common import machine, peak_rss_mib
from config import LoaderConfig, NegativesConfig
from data import schema
from data.batch import TrainBatch
from data.keys import ITEM_KEY, candidate_key, history_key
from data.loader import open_loader
from data.negatives import Negatives
from data.prepare import prepare
from data.sources import read_movielens
from data.splits import SplitConfig
from data.synthetic import SyntheticConfig, generate

ROOT = Path(__file__).resolve().parents[1]

BATCH, NEGATIVES = 1024, 1024


class NaiveDataset(torch.utils.data.Dataset):
    """One dict per example, the way tutorials write it; features of items looked up per item."""

    def __init__(self, directory: Path, meta: schema.Metadata):
        table = pq.read_table([directory / f for f in meta.files[schema.TRAIN_DIR]])
        self.columns = {name: table.column(name).to_pylist() for name in table.column_names}
        self.user_features = [f.name for f in meta.user_features + meta.context_features]

    def __len__(self) -> int:
        return len(self.columns[schema.TARGET])

    def __getitem__(self, i: int) -> dict:
        history = self.columns[schema.HISTORY][i]
        row = {history_key(k): history[-k:] if k else history for k in LoaderConfig().history_bags}
        row["target"] = self.columns[schema.TARGET][i]
        for name in self.user_features:
            row[name] = [self.columns[name][i]]
        return row


class NaiveCollate:
    def __init__(self, directory: Path, meta: schema.Metadata):
        items = pq.read_table(directory / schema.ITEMS_FILE).to_pylist()
        self.item_features = {row[schema.ITEM]: row for row in items}
        self.feature_names = [f.name for f in meta.item_features]
        freq = np.array([0] + [row[schema.FREQ] for row in items], dtype=np.int64)
        self.probs = torch.from_numpy(Negatives.of(NegativesConfig(num_sampled=NEGATIVES), freq).probs)

    def __call__(self, rows: list[dict]) -> TrainBatch:
        negatives = torch.multinomial(self.probs, NEGATIVES, replacement=True).tolist()
        candidates = [row["target"] for row in rows] + negatives
        keys = [k for k in rows[0] if k != "target"]
        lengths, values = [], []
        for key in keys:
            for row in rows:
                lengths.append(len(row[key]))
                values.extend(row[key])
            lengths.extend([0] * NEGATIVES)
        keys.append(ITEM_KEY)
        lengths.extend([1] * len(candidates))
        values.extend(candidates)
        for name in self.feature_names:
            keys.append(candidate_key(name))
            for item in candidates:
                value = self.item_features[item][name]
                value = value if isinstance(value, list) else [value]
                lengths.append(len(value))
                values.extend(value)
        return TrainBatch(
            sparse=KeyedJaggedTensor(keys=keys, values=torch.tensor(values), lengths=torch.tensor(lengths)),
            candidate_ids=torch.tensor(candidates),
            row_mask=torch.ones(len(rows), dtype=torch.bool))


def time_batches(make_iterator, batches: int | None) -> float:
    """Examples per second over `batches` batches (None: all) of a fresh iterator."""
    start = time.perf_counter()
    count = 0
    for _ in make_iterator():
        count += 1
        if count == batches:
            break
    return count * BATCH / (time.perf_counter() - start)


def throughput(directory: Path, runs: int, batches: int) -> dict:
    meta = schema.Metadata.load(directory)
    loader = open_loader(directory, LoaderConfig(batch_size=BATCH),
                         negatives=NegativesConfig(num_sampled=NEGATIVES), meta=meta)
    start = time.perf_counter()
    naive_loader = torch.utils.data.DataLoader(NaiveDataset(directory, meta), batch_size=BATCH, shuffle=True,
                                               collate_fn=NaiveCollate(directory, meta), drop_last=True)
    naive_setup = time.perf_counter() - start
    results = {}
    for name, make, count in (("ours", loader.epoch, None), ("naive", lambda e: naive_loader, batches)):
        time_batches(partial(make, 100), count)
        samples = [time_batches(partial(make, run), count) for run in range(runs)]
        results[name] = {"examples_per_s_median": statistics.median(samples), "examples_per_s_runs": samples}
    results["ratio_ours_over_naive"] = (results["ours"]["examples_per_s_median"]
                                        / results["naive"]["examples_per_s_median"])
    results["naive_setup_seconds"] = naive_setup
    return results


def rss_child(directory: str) -> None:
    """Streams one epoch; prints peak RSS and the RSS before the first batch, in MiB."""
    loader = open_loader(directory, LoaderConfig(batch_size=BATCH),
                         negatives=NegativesConfig(num_sampled=NEGATIVES))
    import psutil

    before = psutil.Process().memory_info().rss / 2**20
    rows = 0
    for batch in loader.epoch(0):
        rows += int(batch.row_mask.sum())
    print(json.dumps({"examples": rows, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}))


def rss(scale_users: list[int], workdir: Path) -> dict:
    results = {}
    for users in scale_users:
        directory = workdir / f"synthetic-{users}"
        if not (directory / schema.METADATA_FILE).exists():
            prepare(generate(SyntheticConfig(num_users=users)), SplitConfig(), directory, overwrite=True)
        out = subprocess.run([sys.executable, "-m", "bench.loader", "--rss-child", str(directory)], check=True,
                             capture_output=True, text=True).stdout
        results[f"{users}_users"] = json.loads(out.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml1m", default=str(ROOT.parent / "shared" / "datasets" / "ml-1m"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--users", type=int, default=SyntheticConfig.num_users, help="synthetic 1x size")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "two-tower-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader.json"))
    parser.add_argument("--rss-child")
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    workdir = Path(args.workdir)
    ml1m = workdir / "ml-1m"
    if not (ml1m / schema.METADATA_FILE).exists():
        prepare(read_movielens(args.ml1m), SplitConfig(), ml1m, overwrite=True)
    result = {
        "machine": machine(),
        "setup": {"batch_size": BATCH, "negatives": NEGATIVES, "sampler": "unigram^0.75", "runs": args.runs,
                  "batches_per_run": args.batches, "dataset": "ML-1M leave-one-out, max history 50"},
        "throughput_ml1m": throughput(ml1m, args.runs, args.batches),
        "rss_synthetic": rss([args.users, 10 * args.users], workdir),
    }
    peaks = [v["peak_rss_mib"] for v in result["rss_synthetic"].values()]
    result["rss_ratio_10x_over_1x"] = peaks[1] / peaks[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    t = result["throughput_ml1m"]
    print(f"ours {t['ours']['examples_per_s_median']:,.0f} ex/s, naive {t['naive']['examples_per_s_median']:,.0f} "
          f"ex/s, ratio {t['ratio_ours_over_naive']:.1f}x; peak RSS 1x {peaks[0]:.0f} MiB, 10x {peaks[1]:.0f} MiB "
          f"(ratio {result['rss_ratio_10x_over_1x']:.2f}) -> {args.out}")


if __name__ == "__main__":
    main()
