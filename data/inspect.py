"""Summarises a prepared dataset and streams one training epoch through the loader.

    python -m data.inspect prepared/synthetic [--batch-size 1024 --negatives 1024]
    python -m data.inspect s3://bucket/prepared/synthetic

This is the end-to-end check of the data layer: metadata, schema validation on every row group,
batches exactly as the trainer receives them, and the loader's throughput.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from config import ConfigError, LoaderConfig, NegativesConfig
from data.errors import DataError
from data.loader import open_loader
from data.schema import Metadata
from storage import StorageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--negatives", type=int, default=1024)
    args = parser.parse_args(argv)
    try:
        meta = Metadata.load(args.path)
        loader = open_loader(args.path, LoaderConfig(batch_size=args.batch_size),
                             negatives=NegativesConfig(num_sampled=args.negatives))
        print(f"{args.path}: {meta.num_users} users, {meta.num_items} items, split {meta.split['protocol']}")
        print("counts: " + ", ".join(f"{k}={v}" for k, v in meta.counts.items()))
        print(f"query keys: {loader.query_keys}\ncandidate keys: {loader.candidate_keys}")
        start, rows = time.perf_counter(), 0
        for batch in tqdm(loader.epoch(0), total=len(loader), desc="epoch 0", unit="batch"):
            rows += int(batch.row_mask.sum())
        seconds = time.perf_counter() - start
    except (ConfigError, DataError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"streamed {rows} examples in {len(loader)} batches of {args.batch_size} (+{args.negatives} negatives) "
          f"in {seconds:.1f}s: {rows / seconds:,.0f} examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
