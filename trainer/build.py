"""The job's components, built from the config: the data it reads and the sharded model it trains.

Order matters and is the one torchrec's golden training example uses: towers and loss on the meta
device, the embedding optimizer fused into the backward, the planner's plan, DistributedModelParallel
materialising the shards, and a dense optimizer over what is left. Every device-dependent check runs
here, once, before any of that work (`check_runtime`).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from config import ConfigError, JobConfig
from config.job import CPU_FUSED_OPTIMIZERS, OPTIMIZERS
from data.errors import DataError
from data.loader import EvalLoader, TrainLoader
from data.schema import Metadata
from sharding.plan import build_plan, check_types, plan_as_json
from sharding.tables import table_configs
from trainer import distributed
from trainer.evaluate import catalogue_embeddings
from trainer.loss import CandidateLogQ, RetrievalLoss, StreamingFrequency
from trainer.model import RetrievalModel, TwoTower

log = logging.getLogger(__name__)


def optimizer_class(name: str) -> type:
    module, _, cls = OPTIMIZERS[name].path.rpartition(".")
    return getattr(importlib.import_module(module), cls)


@dataclass
class JobData:
    """What the job reads: the prepared data's metadata, the training loader and the evaluation loaders."""

    meta: Metadata
    train_loader: TrainLoader
    eval_loaders: dict[str, EvalLoader]


@dataclass
class ShardedModel:
    """The sharded model and what trains it. Its Stateful pieces (`stateful()`) are what a checkpoint holds."""

    towers: TwoTower
    dmp: DistributedModelParallel
    pipeline: TrainPipelineSparseDist
    dense_optimizer: KeyedOptimizerWrapper
    frequency: StreamingFrequency | None
    plan_text: str
    plan_json: str

    def stateful(self) -> dict:
        items = {"model": self.dmp, "fused_optimizer": self.dmp.fused_optimizer,
                 "dense_optimizer": self.dense_optimizer}
        return items | ({"frequency": self.frequency} if self.frequency is not None else {})

    def scorer(self, data: JobData, device: torch.device):
        """Scores evaluation queries against every catalogue item with the current weights."""
        towers = self.towers
        loader = data.train_loader
        items = catalogue_embeddings(lambda kjt: towers.towers(kjt.to(device), 0)[1], loader.catalogue,
                                     towers.query_keys, towers.candidate_keys)

        def score(batch):
            query, _ = towers.towers(batch.sparse.to(device), batch.row_mask.shape[0])
            return query @ items.T

        return score


def check_runtime(cfg: JobConfig, device: torch.device, meta: Metadata) -> None:
    """The checks that depend on the device: the fused optimizer and the sharding types it can run."""
    if device.type != "cuda" and cfg.optim.sparse not in CPU_FUSED_OPTIMIZERS:
        raise ConfigError(f"optim.sparse={cfg.optim.sparse} needs a GPU; FBGEMM's CPU kernels support "
                          f"{list(CPU_FUSED_OPTIMIZERS)}")
    check_types(cfg.sharding, table_configs(meta, cfg.loader, cfg.model), device)


def check_splits(cfg: JobConfig, meta: Metadata) -> None:
    """Before the first step: every split has queries, and the evaluation protocol leaves some to rank."""
    where = Path(cfg.data.path) / "metadata.json"
    if meta.counts["train_examples"] == 0:
        raise DataError(where, "counts.train_examples", "training examples", "none (prepare the data again)")
    for split, name in (("valid", "validation"), ("test", "test")):
        rows = meta.counts[f"{split}_rows"]
        if rows == 0:
            raise DataError(where, f"counts.{split}_rows", f"{name} queries", "none (prepare the data again)")
        if cfg.eval.filter_seen and meta.repeats[split]["queries_all_repeat"] == rows:
            raise ConfigError(f"eval.filter_seen=true leaves no {name} query to evaluate: all {rows} have only "
                              f"targets their user consumed before ({where}: repeats); set eval.filter_seen=false")


def build_data(cfg: JobConfig, env: distributed.Env, meta: Metadata) -> JobData:
    check_splits(cfg, meta)
    large = [k for k in cfg.eval.ks if k >= meta.num_items]
    if large and env.is_main:
        log.warning("eval.ks %s reach the catalogue size (%d items): those metrics are close to 1 by construction",
                    large, meta.num_items)
    train_loader = TrainLoader(cfg.data.path, cfg.loader, env.rank, env.world_size, meta=meta)
    eval_loaders = {split: EvalLoader(cfg.data.path, cfg.loader, split, cfg.eval.batch_size, env.rank,
                                      env.world_size, meta=meta) for split in ("valid", "test")}
    return JobData(meta, train_loader, eval_loaders)


def build_model(cfg: JobConfig, env: distributed.Env, meta: Metadata, freq: np.ndarray,
                proposal: np.ndarray) -> ShardedModel:
    """`freq` (training counts) and `proposal` (the negative sampler's q) feed logQ."""
    towers = TwoTower(meta, cfg.loader, cfg.model, env.device)
    log_q = None
    if cfg.loss.logq:
        log_q = CandidateLogQ(torch.from_numpy(freq).to(env.device), torch.from_numpy(proposal).to(env.device),
                              cfg.loader.num_negatives, cfg.loss.in_batch, cfg.loss.frequency,
                              cfg.loss.streaming_buckets, cfg.loss.streaming_alpha)
    model = RetrievalModel(towers, RetrievalLoss(cfg.loss.temperature, cfg.loss.in_batch,
                                                 cfg.loss.logq_on_positive, log_q, env.world_size))
    _apply_optimizer_in_backward(optimizer_class(cfg.optim.sparse), towers.ebc.parameters(),
                                 {"lr": cfg.optim.sparse_lr})
    plan = build_plan(model, towers.tables, cfg.sharding, meta, cfg.loader.batch_size + cfg.loader.num_negatives,
                      env.world_size, env.device, torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=env.device, plan=plan)
    dense_class = optimizer_class(cfg.optim.dense)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: dense_class(params, lr=cfg.optim.dense_lr))
    pipeline = TrainPipelineSparseDist(dmp, dense, env.device)
    return ShardedModel(dmp.module.towers, dmp, pipeline, dense, log_q.streaming if log_q else None, str(plan),
                        plan_as_json(plan))
