"""Builds the sharding plan with TorchRec's planner, from the real topology and data statistics.

    python -m sharding.plan --config configs/X.yaml --world-size N [--device cuda --hbm-gb 80] [key=value ...]

plans the job's tables for a hypothetical cluster without starting it (planning on paper).

Batch size and per-feature pooling factors come from the prepared data's metadata, not from the
planner's defaults; allowed sharding types and the compute kernel come from config and are
checked against what the device can run before any work starts. The tables are those of
sharding/tables.py, which the model declares too.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingConfig

from config import ConfigError, ShardingConfig, load_config
from data.errors import DataError
from data.keys import SEQUENCE_KEY, candidate_feature, history_window
from data.schema import Metadata
from sharding.tables import sequence_table_configs, table_configs

CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
GPU_SHARDING_TYPES = CPU_SHARDING_TYPES + ("row_wise", "table_row_wise")


class ShardingError(ValueError):
    pass


def possible_types(device: torch.device) -> tuple[str, ...]:
    return GPU_SHARDING_TYPES if device.type == "cuda" else CPU_SHARDING_TYPES


def check_types(cfg: ShardingConfig, tables: list[BaseEmbeddingConfig], device: torch.device) -> None:
    """Fails before any work when config asks for a placement this device cannot run."""
    allowed = possible_types(device)
    names = {t.name for t in tables}
    for t in tables:
        if isinstance(t, EmbeddingConfig) and "data_parallel" in cfg.per_table.get(t.name, cfg.sharding_types):
            raise ShardingError(f"table '{t.name}' is an unpooled EmbeddingCollection table, which TorchRec cannot "
                                f"shard data_parallel; set sharding.per_table.{t.name} to other types")
    unknown = sorted(set(cfg.per_table) - names)
    if unknown:
        raise ShardingError(f"sharding.per_table names unknown tables {unknown}; tables are {sorted(names)}")
    for where, types in [("sharding.sharding_types", cfg.sharding_types)] + [
            (f"sharding.per_table.{name}", types) for name, types in cfg.per_table.items()]:
        bad = [t for t in types if t not in allowed]
        if bad:
            raise ShardingError(f"{where} asks for {bad}, which {device.type.upper()} cannot run; possible on "
                                f"{device.type}: {list(allowed)}")
        if not types:
            raise ShardingError(f"{where} is empty; possible on {device.type}: {list(allowed)}")


def pooling_factor(feature: str, meta: Metadata) -> float:
    """Mean ids per bag of a feature key, from the prepared data."""
    if feature == SEQUENCE_KEY:
        return max(meta.mean_sequence_length, 1.0)
    window = history_window(feature)
    if window is not None:
        return max(min(float(window or meta.mean_history_length), meta.mean_history_length), 1.0)
    specs = {f.name: f for f in meta.item_features + meta.user_features + meta.context_features}
    spec = specs.get(candidate_feature(feature) or feature)
    return max(spec.mean_length, 1.0) if spec and spec.multi else 1.0


def kernels(types: list[str], kernel: str) -> list[str]:
    """The configured kernel; data-parallel tables can only use the dense one (replicated weights)."""
    return [kernel] + (["dense"] if "data_parallel" in types and kernel != "dense" else [])


def constraints(cfg: ShardingConfig, tables: list[BaseEmbeddingConfig], meta: Metadata) -> dict:
    out = {}
    for t in tables:
        types = cfg.per_table.get(t.name, cfg.sharding_types)
        out[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels(types, cfg.compute_kernel),
                                           pooling_factors=[pooling_factor(f, meta) for f in t.feature_names])
    return out


def build_plan(module: torch.nn.Module, tables: list[BaseEmbeddingConfig], cfg: ShardingConfig, meta: Metadata,
               batch_size: int, world_size: int, device: torch.device, process_group=None,
               hbm_gb: float | None = None) -> ShardingPlan:
    """The plan for `module`'s tables (checked with `check_types` first); collective when a process group is
    given, so all ranks agree."""
    topology_args = {"world_size": world_size, "compute_device": device.type}
    if hbm_gb is not None:
        topology_args["hbm_cap"] = int(hbm_gb * 2**30)
    planner = EmbeddingShardingPlanner(topology=Topology(**topology_args), batch_size=batch_size,
                                       constraints=constraints(cfg, tables, meta))
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    if process_group is not None:
        return planner.collective_plan(module, sharders, process_group)
    return planner.plan(module, sharders)


def plan_as_json(plan: ShardingPlan) -> str:
    """Readable JSON: per module and table, sharding type, compute kernel and each shard's rank/offsets."""
    out = {}
    for module_path, module_plan in plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if spec.sharding_spec is not None:
                shards = [{"rank": s.placement.rank(), "offsets": s.shard_offsets, "sizes": s.shard_sizes}
                          for s in spec.sharding_spec.shards]
            else:
                shards = [{"ranks": spec.ranks}]
            out[f"{module_path}.{table}"] = {"sharding_type": spec.sharding_type,
                                             "compute_kernel": spec.compute_kernel, "shards": shards}
    return json.dumps(out, indent=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding.plan", description="Plans the job's tables for a "
                                     "cluster of the given size without starting it.")
    parser.add_argument("--config")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hbm-gb", type=float, help="memory per device (GPU HBM), in GiB")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        meta = Metadata.load(cfg.data.path)
        bags, sequences = table_configs(meta, cfg.loader, cfg.model), sequence_table_configs(meta, cfg.model)
        tables = bags + sequences
        device = torch.device(args.device)
        check_types(cfg.sharding, tables, device)
        modules = {"ebc": EmbeddingBagCollection(tables=bags, device=torch.device("meta"))} if bags else {}
        if sequences:
            modules["ec"] = EmbeddingCollection(tables=sequences, device=torch.device("meta"))
        module = torch.nn.ModuleDict(modules)
        plan = build_plan(module, tables, cfg.sharding, meta, cfg.loader.batch_size + cfg.loader.num_negatives,
                          args.world_size, device, hbm_gb=args.hbm_gb)
    except (ConfigError, DataError, ShardingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan_as_json(plan) if args.json else plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
