"""Model assembly: the job's components built from the config, the data it reads and the sharded model it trains
(the towers of towers/, chosen by model.query_tower, plus the loss: `RetrievalModel`).

Order matters and is the one torchrec's golden training example uses: towers and loss on the meta
device, the embedding optimizer fused into the backward, the planner's plan, DistributedModelParallel
materialising the shards, and a dense optimizer over what is left. Every device-dependent check runs
here, once, before any of that work (`check_runtime`).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DataParallelWrapper, DefaultDataParallelWrapper
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

import towers
from config import ConfigError, JobConfig
from config.job import CPU_FUSED_OPTIMIZERS, OPTIMIZERS, OptimConfig
from data.batch import SequenceBatch, TrainBatch
from data.errors import DataError
from data.loader import EvalLoader, TrainLoader, open_loader
from data.negatives import Negatives
from data.schema import METADATA_FILE, Metadata
from sharding.plan import build_plan, check_types, plan_as_json
from storage import location
from trainer import distributed
from trainer.loss.logq import StreamingFrequency
from trainer.loss.modules import build_loss
from trainer.precision import autocast, warn_if_slow

log = logging.getLogger(__name__)


class RetrievalModel(torch.nn.Module):
    """Towers plus loss: forward(batch) -> (loss, stats), the contract TrainPipelineSparseDist expects. The towers
    run under train.precision's autocast (trainer/precision.py); the loss gets float32 embeddings and picks its
    own product dtype."""

    def __init__(self, towers: torch.nn.Module, loss_fn, precision: str = "fp32", device_type: str = "cpu"):
        super().__init__()
        self.towers = towers
        self.loss_fn = loss_fn
        self.precision, self.device_type = precision, device_type  # plain values: the pipeline's tracer reads them

    def forward(self, batch: TrainBatch | SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with autocast(self.precision, self.device_type):
            query, candidates = self.towers.encode(batch)
        query, candidates = query.float(), candidates.float()
        loss = self.loss_fn(query, candidates, batch)
        return loss, {"loss": loss.detach(), "examples": query.new_tensor(batch.num_examples)}


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

    towers: torch.nn.Module  # the tower's build(): see towers/base.py
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

    def scale_learning_rates(self, optim: OptimConfig, scale: float) -> None:
        """Both optimizers at their configured rates times `scale`. The fused embedding kernels read their rate
        only in the fused optimizer's zero_grad or step, which training never calls (the update runs in the
        backward), so zero_grad pushes it there."""
        for optimizer, lr in ((self.dmp.fused_optimizer, optim.sparse_lr), (self.dense_optimizer, optim.dense_lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
        self.dmp.fused_optimizer.zero_grad()

    def scorer(self, data: JobData, device: torch.device):
        """Scores evaluation queries against every catalogue item with the current weights."""
        modules = self.towers
        items = modules.item_embeddings(data.train_loader.catalogue, device)

        def score(batch):
            return modules.query_embeddings(batch, device) @ items.T

        return score


class OneProcess(DataParallelWrapper):
    """The dense modules of a world of one, unwrapped: DDP there only costs time (its forward hooks and a gradient
    division by 1, about 3 ms per bag step on CPU) and synchronises with nothing."""

    def wrap(self, dmp: DistributedModelParallel, env, device: torch.device) -> None:
        dmp.module.to(device)


def data_parallel_wrapper(world_size: int) -> DataParallelWrapper:
    return OneProcess() if world_size == 1 else DefaultDataParallelWrapper()


def check_runtime(cfg: JobConfig, device: torch.device, meta: Metadata) -> None:
    """The checks that depend on the device: the fused optimizer and the sharding types it can run."""
    if device.type != "cuda" and cfg.optim.sparse not in CPU_FUSED_OPTIMIZERS:
        raise ConfigError(f"optim.sparse={cfg.optim.sparse} needs a GPU; FBGEMM's CPU kernels support "
                          f"{list(CPU_FUSED_OPTIMIZERS)}")
    tower = towers.of(cfg)
    check_types(cfg.sharding, tower.bag_tables(meta, cfg) + tower.sequence_tables(meta, cfg), device)
    warn_if_slow(cfg.train.precision, device)


def check_splits(cfg: JobConfig, meta: Metadata) -> None:
    """Before the first step: every split has queries, and the evaluation protocol leaves some to rank."""
    where = location(cfg.data.path) / METADATA_FILE
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
    layout = towers.of(cfg).layout
    if layout.sequence and cfg.loader.max_sequence_length > meta.max_history and env.is_main:
        log.warning("loader.max_sequence_length=%d, but the data was prepared with --max-history %d: evaluation "
                    "queries hold at most %d items while training chunks hold up to %d (prepare again with a "
                    "larger --max-history)", cfg.loader.max_sequence_length, meta.max_history, meta.max_history,
                    cfg.loader.max_sequence_length)
    train_loader = open_loader(cfg.data.path, cfg.loader, "train", env.rank, env.world_size, meta, layout=layout,
                               negatives=cfg.negatives)
    eval_loaders = {split: open_loader(cfg.data.path, cfg.loader, split, env.rank, env.world_size, meta,
                                       cfg.eval.batch_size, layout) for split in ("valid", "test")}
    return JobData(meta, train_loader, eval_loaders)


def build_model(cfg: JobConfig, env: distributed.Env, meta: Metadata, freq: np.ndarray,
                negatives: Negatives) -> ShardedModel:
    """`freq` (training counts) and `negatives` (the loader's) feed the loss and its logQ."""
    tower = towers.of(cfg)
    modules = tower.build(meta, cfg, env.device)
    loss = build_loss(cfg, negatives, freq, tower.layout.sequence, env.device, env.world_size)
    model = RetrievalModel(modules, loss, cfg.train.precision, env.device.type)
    for collection in modules.collections():
        _apply_optimizer_in_backward(optimizer_class(cfg.optim.sparse), collection.parameters(),
                                     {"lr": cfg.optim.sparse_lr})
    tables = tower.bag_tables(meta, cfg) + tower.sequence_tables(meta, cfg)
    plan = build_plan(model, tables, cfg.sharding, meta, cfg.loader.batch_size + negatives.num_sampled,
                      env.world_size, env.device, torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=env.device, plan=plan,
                                  data_parallel_wrapper=data_parallel_wrapper(env.world_size))
    dense_class = optimizer_class(cfg.optim.dense)
    # torch's fused Adam updates every MLP tensor in one kernel, CPU or CUDA: about 3x faster than its default
    # for-each path, and it is a fixed cost of every step.
    fused = {"fused": True} if cfg.optim.dense == "adam" else {}
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: dense_class(params, lr=cfg.optim.dense_lr, **fused))
    pipeline = TrainPipelineSparseDist(dmp, dense, env.device)
    streaming = loss.log_q.streaming if loss.log_q else None
    return ShardedModel(dmp.module.towers, dmp, pipeline, dense, streaming, str(plan), plan_as_json(plan))
