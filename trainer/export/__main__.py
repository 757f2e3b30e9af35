"""python -m trainer.export --checkpoint CKPT_DIR --out OUT_DIR [section.key=value ...]

A checkpoint (written by any number of ranks, with any sharding) -> an unsharded serving artifact in the format
of serving/format.py, readable without TorchRec (trainer/export/artifact.py)."""

from __future__ import annotations

import argparse
import sys

from config import ConfigError
from data.errors import DataError
from serving.console import quiet
from serving.format import (
    RECALL_K,
)
from storage import StorageError
from trainer.export.artifact import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (step-N, or best-N), local or a "
                                                            "URI")
    parser.add_argument("--out", required=True, help="the export directory to write, local or a URI (replaced if it "
                                                     "exists)")
    parser.add_argument("overrides", nargs="*", help="section.key=value over the checkpoint's config, "
                                                     "e.g. data.path=... or export.hnsw_m=48")
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' known warnings")
    args = parser.parse_intermixed_args(argv)
    quiet(args.verbose)
    try:
        manifest = export(args.checkpoint, args.out, overrides=args.overrides)
    except (ConfigError, DataError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    index = manifest.index
    print(f"exported {manifest.items['count']} items to {args.out}; {index['kind']} index recall@{RECALL_K} "
          f"against exact search {index[f'recall@{RECALL_K}']:.4f} on {index['recall_queries']} validation queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
