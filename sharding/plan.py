"""Builds the sharding plan with TorchRec's planner, from the real topology and data statistics.

    python -m sharding.plan --config configs/X.yaml --world-size N [--device cuda --hbm-gb 80] [key=value ...]

plans the job's tables for a hypothetical cluster without starting it (planning on paper). With
`--items`, `--users` and `--mean-history` it plans tables of that size before any data exists (features
and their statistics are then those of `data.path` where it is prepared, else none), prints each rank's
memory and the planner's estimated step time, and when the tables cannot fit names the smallest world
size that fits.

Batch size and per-feature pooling factors come from the prepared data's metadata, not from the
planner's defaults; allowed sharding types and the compute kernel come from config and are
checked against what the device can run before any work starts. The tables are those of
the job's tower (towers/), which the model declares too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, ShardingOption, Stats
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, EmbeddingConfig

import towers
from config import ConfigError, ShardingConfig, load_config
from data.errors import DataError
from data.keys import SEQUENCE_KEY, candidate_feature, history_window
from data.schema import METADATA_FILE, SCHEMA_VERSION, Metadata
from storage import location

CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")
GPU_SHARDING_TYPES = CPU_SHARDING_TYPES + ("row_wise", "table_row_wise")
# EmbeddingCollection (unpooled) tables: TorchRec has no table-column-wise sharder for them, and data-parallel
# fails; row-wise runs on CPU too (tests/e2e/test_distributed.py trains each of these on two processes).
UNPOOLED_SHARDING_TYPES = ("table_wise", "column_wise", "row_wise")
MAX_WORLD_SIZE = 1 << 16  # the search for a world size that fits gives up beyond this


class ShardingError(ValueError):
    pass


def possible_types(device: torch.device, unpooled: bool = False) -> tuple[str, ...]:
    if unpooled:
        return UNPOOLED_SHARDING_TYPES
    return GPU_SHARDING_TYPES if device.type == "cuda" else CPU_SHARDING_TYPES


def check_types(cfg: ShardingConfig, tables: list[BaseEmbeddingConfig], device: torch.device) -> None:
    """Fails before any work when config asks for a placement this device (or, for an EmbeddingCollection
    table, TorchRec's sharder) cannot run, naming the config key and the possible types."""
    names = {t.name for t in tables}
    unknown = sorted(set(cfg.per_table) - names)
    if unknown:
        raise ShardingError(f"sharding.per_table names unknown tables {unknown}; tables are {sorted(names)}")
    for where, types in [("sharding.sharding_types", cfg.sharding_types)] + [
            (f"sharding.per_table.{name}", types) for name, types in cfg.per_table.items()]:
        if not types:
            raise ShardingError(f"{where} is empty; possible on {device.type}: {list(possible_types(device))}")
    if cfg.compute_kernel.startswith("fused_uvm") and device.type != "cuda":
        raise ShardingError(f"sharding.compute_kernel={cfg.compute_kernel} keeps tables in CUDA unified memory, which "
                            f"{device.type.upper()} does not have; use fused")
    for t in tables:
        unpooled = isinstance(t, EmbeddingConfig)
        where = f"sharding.per_table.{t.name}" if t.name in cfg.per_table else "sharding.sharding_types"
        allowed = possible_types(device, unpooled)
        bad = [x for x in cfg.per_table.get(t.name, cfg.sharding_types) if x not in allowed]
        if bad and unpooled:
            raise ShardingError(f"{where} asks for {bad} for '{t.name}', an unpooled EmbeddingCollection table, "
                                f"which TorchRec shards only as {list(allowed)}; set sharding.per_table.{t.name}")
        if bad:
            raise ShardingError(f"{where} asks for {bad}, which {device.type.upper()} cannot run; possible on "
                                f"{device.type}: {list(allowed)}")
        if cfg.compute_kernel == "dense" and "data_parallel" not in cfg.per_table.get(t.name, cfg.sharding_types):
            raise ShardingError(f"sharding.compute_kernel=dense replicates every table (data_parallel), but {where} "
                                f"places '{t.name}' only as {cfg.per_table.get(t.name, cfg.sharding_types)}; use "
                                f"compute_kernel fused, or allow data_parallel there")


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


class BestPlan(Stats):
    """Keeps the planner's chosen sharding options (with their storage and perf estimates) for `per_rank`."""

    def __init__(self):
        self.options: list[ShardingOption] = []

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans, run_time,
            best_plan, *args, **kwargs) -> None:
        self.options = list(best_plan)


def build_plan(module: torch.nn.Module, tables: list[BaseEmbeddingConfig], cfg: ShardingConfig, meta: Metadata,
               batch_size: int, world_size: int, device: torch.device, process_group=None,
               hbm_gb: float | None = None, host_gb: float | None = None, local_world_size: int | None = None,
               stats: Stats | None = None) -> ShardingPlan:
    """The plan for `module`'s tables (checked with `check_types` first); collective when a process group is
    given, so all ranks agree."""
    topology_args = {"world_size": world_size, "compute_device": device.type}
    if hbm_gb is not None:
        topology_args["hbm_cap"] = int(hbm_gb * 2**30)
    if host_gb is not None:
        topology_args["ddr_cap"] = int(host_gb * 2**30)
    if local_world_size is not None:
        topology_args["local_world_size"] = min(local_world_size, world_size)
    planner = EmbeddingShardingPlanner(topology=Topology(**topology_args), batch_size=batch_size,
                                       constraints=constraints(cfg, tables, meta),
                                       stats=[stats] if stats is not None else None)
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


def every_type(cfg: ShardingConfig, sequence_tables: list[EmbeddingConfig], device: torch.device) -> ShardingConfig:
    """`cfg` letting the planner choose among every type `device` runs (for EmbeddingCollection tables, every type
    TorchRec shards them with)."""
    unpooled = list(possible_types(device, unpooled=True))
    return dataclasses.replace(cfg, sharding_types=list(possible_types(device)),
                               per_table={t.name: unpooled for t in sequence_tables})


def paper_metadata(base: Metadata | None, items: int | None, users: int | None,
                   mean_history: float | None) -> Metadata:
    """`base` (the prepared data's metadata, or an empty catalogue) with the given sizes: every history
    pooling factor, and the transformer's sequence length, become `mean_history`."""
    if base is None:
        base = Metadata(schema_version=SCHEMA_VERSION, source={"kind": "paper"}, split={}, filters={},
                        max_history=0, num_users=0, num_items=0, counts={})
    changes = {}
    if items is not None:
        changes["num_items"] = items
    if users is not None:
        changes["num_users"] = users
    if mean_history is not None:
        changes.update(mean_history_length=mean_history, mean_sequence_length=mean_history,
                       max_history=max(base.max_history, int(mean_history)))
    return dataclasses.replace(base, **changes)


def per_rank(options: list[ShardingOption], world_size: int) -> list[dict]:
    """Per rank: HBM and host bytes of its shards (optimizer state and the planner's I/O estimates
    included) and the planner's estimated step time in ms (forward, backward and communication)."""
    ranks = [{"rank": r, "hbm_bytes": 0, "host_bytes": 0, "step_ms": 0.0, "shards": 0} for r in range(world_size)]
    for option in options:
        for shard in option.shards:
            row = ranks[shard.rank]
            row["shards"] += 1
            row["hbm_bytes"] += shard.storage.hbm if shard.storage else 0
            row["host_bytes"] += shard.storage.ddr if shard.storage else 0
            row["step_ms"] += shard.perf.total if shard.perf else 0.0
    return ranks


def describe(options: list[ShardingOption], ranks: list[dict], hbm_gb: float | None, host_gb: float | None,
             device: torch.device) -> str:
    """The chosen sharding type per table, then one line per rank."""
    gib = float(2**30)
    lines = [f"{'table':24} {'rows':>14} {'dim':>5} {'sharding type':18} {'kernel':8} shards"]
    for o in options:
        lines.append(f"{o.name:24} {o.tensor.shape[0]:>14,} "
                     f"{o.tensor.shape[1]:>5} {o.sharding_type:18} {o.compute_kernel:8} {len(o.shards)}")
    hbm = f" of {hbm_gb:g}" if hbm_gb else ""
    host = f" of {host_gb:g}" if host_gb else ""
    memory = f"HBM GiB{hbm}" if device.type == "cuda" else f"memory GiB{host}"
    lines.append("")
    lines.append(f"{'ranks':>9} {memory:>16} {'host GiB' + host:>16} {'est. step ms':>13} {'shards':>7}")
    rows = [(f"{r['hbm_bytes'] / gib:>16.2f} {r['host_bytes'] / gib:>16.2f} {r['step_ms']:>13.2f} "
             f"{r['shards']:>7}") for r in ranks]
    start = 0
    for i in range(1, len(rows) + 1):  # consecutive ranks with the same figures share a line
        if i == len(rows) or rows[i] != rows[start]:
            span = str(start) if i - 1 == start else f"{start}-{i - 1}"
            lines.append(f"{span:>9} {rows[start]}")
            start = i
    return "\n".join(lines)


def smallest_fitting_world(fits, world_size: int, step: int) -> int | None:
    """The smallest multiple of `step` above `world_size` for which `fits(n)` holds (doubling, then bisecting),
    or None up to MAX_WORLD_SIZE."""
    low, high = world_size, None
    n = max(world_size * 2, step)
    while n <= MAX_WORLD_SIZE:
        if fits(n):
            high = n
            break
        low, n = n, n * 2
    if high is None:
        return None
    while high - low > step:
        mid = (low + high) // 2 // step * step
        if mid <= low:
            break
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def plan_or_explain(plan_for, world_size: int, stats: Stats, paper: bool, step: int,
                    tables: list[BaseEmbeddingConfig]) -> ShardingPlan:
    """`plan_for(world_size)`, or a ShardingError that (on paper) names the smallest world size that fits."""
    try:
        return plan_for(world_size, stats)
    except PlannerError as err:
        if not paper:
            raise ShardingError(f"the tables do not fit {world_size} ranks: {str(err).splitlines()[0]}") from err

        def fits(n: int) -> bool:
            try:
                plan_for(n)
                return True
            except PlannerError:
                return False

        smallest = smallest_fitting_world(fits, world_size, step)
        size = sum(t.num_embeddings * t.embedding_dim * 4 for t in tables) / 2**30
        where = f"the smallest world size that fits is {smallest}" if smallest else \
            f"no world size up to {MAX_WORLD_SIZE} fits"
        raise ShardingError(f"the tables ({size:,.1f} GiB of fp32 weights before optimizer state) do not fit "
                            f"{world_size} ranks with these sharding types; {where}") from err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding.plan", description="Plans the job's tables for a "
                                     "cluster of the given size without starting it.")
    parser.add_argument("--config")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hbm-gb", type=float, help="memory per device (GPU HBM), in GiB")
    parser.add_argument("--host-gb", type=float, help="host memory per rank, in GiB (planner default 128)")
    parser.add_argument("--ranks-per-host", type=int, help="ranks per host, for the communication estimates "
                        "(default: every rank on one host)")
    parser.add_argument("--items", type=float, help="plan for this many items (e.g. 1e9) instead of the data's")
    parser.add_argument("--users", type=float, help="plan a user-id table of this many users (sets "
                        "loader.use_user_id=true)")
    parser.add_argument("--mean-history", type=float, help="mean history / sequence length: the pooling factor "
                        "of the history features")
    parser.add_argument("--all-types", action="store_true", help="let the planner choose among every sharding "
                        "type the device can run, instead of sharding.sharding_types")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    paper = args.items is not None or args.users is not None or args.mean_history is not None
    try:
        overrides = list(args.overrides) + (["loader.use_user_id=true"] if args.users is not None else [])
        cfg = towers.resolve(load_config(args.config, overrides))
        device = torch.device(args.device)
        for name, value in (("--items", args.items), ("--users", args.users), ("--mean-history", args.mean_history)):
            if value is not None and not value >= 1:
                raise ShardingError(f"{name} must be at least 1, got {value:g}")
        prepared = (location(cfg.data.path) / METADATA_FILE).is_file()
        meta = Metadata.load(cfg.data.path) if prepared or not paper else None
        if paper:
            meta = paper_metadata(meta, None if args.items is None else int(args.items),
                                  None if args.users is None else int(args.users), args.mean_history)
        tower = towers.of(cfg)
        bags, sequences = tower.bag_tables(meta, cfg), tower.sequence_tables(meta, cfg)
        tables = bags + sequences
        if args.all_types:
            cfg = dataclasses.replace(cfg, sharding=every_type(cfg.sharding, sequences, device))
        check_types(cfg.sharding, tables, device)
        modules = {"ebc": EmbeddingBagCollection(tables=bags, device=torch.device("meta"))} if bags else {}
        if sequences:
            modules["ec"] = EmbeddingCollection(tables=sequences, device=torch.device("meta"))
        module = torch.nn.ModuleDict(modules)
        batch = cfg.loader.batch_size + cfg.negatives.per_batch(meta.num_items)

        def plan_for(world_size: int, stats: Stats | None = None) -> ShardingPlan:
            return build_plan(module, tables, cfg.sharding, meta, batch, world_size, device, hbm_gb=args.hbm_gb,
                              host_gb=args.host_gb, local_world_size=args.ranks_per_host, stats=stats)

        best = BestPlan()
        plan = plan_or_explain(plan_for, args.world_size, best, paper, args.ranks_per_host or 1, tables)
    except (ConfigError, DataError, ShardingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = json.loads(plan_as_json(plan))
        if paper:
            out = {"plan": out, "ranks": per_rank(best.options, args.world_size)}
        print(json.dumps(out, indent=2))
    elif paper:
        print(describe(best.options, per_rank(best.options, args.world_size), args.hbm_gb, args.host_gb, device))
    else:
        print(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
