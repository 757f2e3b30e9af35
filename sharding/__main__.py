"""python -m sharding --config configs/X.yaml --world-size N [--device cuda --hbm-gb 80] [key=value ...]

Plans the job's tables for a hypothetical cluster without starting it: the same planner, data
statistics and constraints as training, a Topology of the size you name.
"""

from __future__ import annotations

import argparse
import sys

import torch

from data.errors import DataError
from data.schema import Metadata
from sharding.plan import ShardingError, build_plan, plan_as_json
from trainer.config import ConfigError, load_config
from trainer.model import TwoTower


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hbm-gb", type=float, help="memory per device (GPU HBM), in GiB")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        meta = Metadata.load(cfg.data.path)
        towers = TwoTower(meta, cfg.loader, cfg.model, torch.device("meta"))
        plan = build_plan(towers, towers.tables, cfg.sharding, meta, cfg.loader.batch_size + cfg.loader.num_negatives,
                          args.world_size, torch.device(args.device), hbm_gb=args.hbm_gb)
    except (ConfigError, DataError, ShardingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan_as_json(plan) if args.json else plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
