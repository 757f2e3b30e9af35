"""The training job: build, shard, train with TrainPipelineSparseDist, evaluate, track.

The same function serves dev mode (one process, no launcher) and torchrun/torchx (one process per
rank): only the environment differs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torchrec
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from data.errors import DataError
from data.loader import ExampleLoader
from data.schema import Metadata
from sharding.plan import build_plan, check_types, plan_as_json
from trainer import checkpoint, distributed
from trainer.config import CPU_FUSED_OPTIMIZERS, ConfigError, JobConfig, dump, flatten, to_dict
from trainer.evaluate import evaluate, item_kjt_chunks, popularity_scorer
from trainer.export import RECALL_K, export
from trainer.loss import CandidateLogQ, RetrievalLoss, StreamingFrequency
from trainer.model import RetrievalModel, TwoTower, table_configs
from trainer.plots import log_plots
from trainer.tracking import Tracker

ITEM_CHUNK = 8192
COUNTS = ("users", "skipped")  # evaluation counts, not metrics
BEST_MODEL = "best"  # the selected epoch's weights, under checkpoint.dir: what export reads
log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


OPTIMIZERS = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD,
              "adam": torch.optim.Adam}


class TimedIterator:
    """Counts the time the training loop spends waiting for data."""

    def __init__(self, source: Iterator):
        self.source = source
        self.wait = 0.0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.source)
        finally:
            self.wait += time.perf_counter() - start


@dataclass
class ShardedModel:
    towers: TwoTower
    dmp: DistributedModelParallel
    pipeline: TrainPipelineSparseDist
    dense_optimizer: KeyedOptimizerWrapper
    streaming_frequency: StreamingFrequency | None
    plan_text: str
    plan_json: str


@dataclass
class Job(ShardedModel):
    cfg: JobConfig
    env: distributed.Env
    meta: Metadata
    train_loader: ExampleLoader
    eval_loaders: dict[str, ExampleLoader]


def build_model(cfg: JobConfig, env: distributed.Env, meta: Metadata, freq: np.ndarray,
                proposal: np.ndarray) -> ShardedModel:
    """Towers and loss on the meta device, embedding optimizer fused into the backward, sharded by the
    planner, and the dense optimizer over what is left. `freq` and `proposal` feed logQ."""
    towers = TwoTower(meta, cfg.loader, cfg.model, env.device)
    log_q = None
    if cfg.loss.logq:
        log_q = CandidateLogQ(torch.from_numpy(freq).to(env.device), torch.from_numpy(proposal).to(env.device),
                              cfg.loader.num_negatives, cfg.loss.in_batch, cfg.loss.frequency,
                              cfg.loss.streaming_buckets, cfg.loss.streaming_alpha)
    model = RetrievalModel(towers, RetrievalLoss(cfg.loss.temperature, cfg.loss.in_batch,
                                                 cfg.loss.logq_on_positive, log_q, env.world_size))
    _apply_optimizer_in_backward(OPTIMIZERS[cfg.optim.sparse], towers.ebc.parameters(), {"lr": cfg.optim.sparse_lr})
    plan = build_plan(model, towers.tables, cfg.sharding, meta, cfg.loader.batch_size + cfg.loader.num_negatives,
                      env.world_size, env.device, torch.distributed.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=env.device, plan=plan)
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: OPTIMIZERS[cfg.optim.dense](params, lr=cfg.optim.dense_lr))
    pipeline = TrainPipelineSparseDist(dmp, dense, env.device)
    return ShardedModel(dmp.module.towers, dmp, pipeline, dense, log_q.streaming if log_q else None, str(plan),
                        plan_as_json(plan))


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


def protocol_summary(cfg: JobConfig, meta: Metadata) -> str:
    """One line saying what the evaluation numbers will mean."""
    filtering = ("seen items filtered (eval.filter_seen=true); queries whose targets were all consumed before "
                 "are skipped" if cfg.eval.filter_seen else "nothing filtered (eval.filter_seen=false)")
    counts = []
    for split, name in (("valid", "validation"), ("test", "test")):
        skipped = meta.repeats[split]["queries_all_repeat"] if cfg.eval.filter_seen else 0
        counts.append(f"{name} {meta.counts[f'{split}_rows'] - skipped} queries ({skipped} skipped)")
    return (f"evaluation: {meta.split['protocol']} split, full catalogue of {meta.num_items} items, {filtering}; "
            f"{', '.join(counts)}")


def build(cfg: JobConfig, env: distributed.Env) -> Job:
    if env.device.type != "cuda" and cfg.optim.sparse not in CPU_FUSED_OPTIMIZERS:
        raise ConfigError(f"optim.sparse={cfg.optim.sparse} needs a GPU; FBGEMM's CPU kernels support "
                          f"{list(CPU_FUSED_OPTIMIZERS)}")
    seed_everything(cfg.seed)
    meta = Metadata.load(cfg.data.path)
    check_splits(cfg, meta)
    check_types(cfg.sharding, table_configs(meta, cfg.loader, cfg.model), env.device)
    train_loader = ExampleLoader(cfg.data.path, cfg.loader, "train", env.rank, env.world_size, meta=meta)
    eval_cfg = replace(cfg.loader, batch_size=cfg.eval.batch_size, num_negatives=0)
    eval_loaders = {split: ExampleLoader(cfg.data.path, eval_cfg, split, env.rank, env.world_size, meta=meta)
                    for split in ("valid", "test")}
    large = [k for k in cfg.eval.ks if k >= meta.num_items]
    if large and env.is_main:
        log.warning("eval.ks %s reach the catalogue size (%d items): those metrics are close to 1 by construction",
                    large, meta.num_items)
    model = build_model(cfg, env, meta, train_loader.catalogue.freq, train_loader.sampler.probs)
    return Job(**{f.name: getattr(model, f.name) for f in fields(model)}, cfg=cfg, env=env, meta=meta,
               train_loader=train_loader, eval_loaders=eval_loaders)


def model_scorer(job: Job):
    """Scores queries against every catalogue item with the current towers (pipeline detached)."""
    towers, device = job.towers, job.env.device
    with torch.no_grad():
        chunks = item_kjt_chunks(job.train_loader.catalogue, towers.query_keys, towers.candidate_keys,
                                 job.meta.num_items, ITEM_CHUNK)
        items = torch.cat([towers.towers(kjt.to(device), 0)[1] for kjt in chunks])

    def score(batch):
        query, _ = towers.towers(batch.sparse.to(device), batch.row_mask.shape[0])
        return query @ items.T

    return score


def run_eval(job: Job, split: str, scorer=None) -> dict[str, float]:
    job.pipeline.detach()
    job.dmp.eval()
    metrics = evaluate(scorer or model_scorer(job), job.eval_loaders[split].epoch(0), job.cfg.eval.ks,
                       job.meta.num_items, job.env.device, job.cfg.eval.filter_seen)
    job.dmp.train()
    return metrics


def environment_params(env: distributed.Env) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"env.world_size": str(env.world_size), "env.device": str(env.device), "env.backend": env.backend,
            "env.torch": torch.__version__, "env.torchrec": torchrec.__version__,
            "env.python": platform.python_version(), "env.git_commit": commit}


def train(cfg: JobConfig) -> dict:
    env = distributed.init(cfg.train.device, cfg.train.collective_timeout_s)
    resume = checkpoint.latest(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    run_id = checkpoint.read_state(resume).get("run_id") if resume else None
    tracker = Tracker(cfg.tracking, run_id) if cfg.tracking.enabled and env.is_main else None
    try:
        summary = fit(build(cfg, env), tracker, resume)
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    if tracker:
        summary["run_id"] = tracker.run_id
        tracker.finish("FINISHED")
    return summary


def initial_state(cfg: JobConfig, tracker: Tracker | None) -> dict:
    """The loop's position and model-selection state: what a checkpoint needs to resume exactly.
    Rank 0 owns the MLflow run; every rank learns its id, which is kept with each checkpoint."""
    run_id = [tracker.run_id if tracker else None]
    torch.distributed.broadcast_object_list(run_id, src=0)
    return {"epoch": 0, "batch": 0, "step": 0, "best_value": -1.0, "best_epoch": -1, "best_test": None,
            "patience": cfg.train.early_stopping_patience, "stopped": False, "history": [], "run_id": run_id[0]}


def fit(job: Job, tracker: Tracker | None, resume: Path | None = None) -> dict:
    cfg, env = job.cfg, job.env
    if env.is_main:
        print(job.plan_text)
        print(protocol_summary(cfg, job.meta))
    state = initial_state(cfg, tracker)
    if resume:
        state.update(checkpoint.load(job, resume))
        if env.is_main:
            print(f"resumed from {resume} at epoch {state['epoch']}, batch {state['batch']}, step {state['step']}")
    elif tracker:
        tracker.log_params({**flatten(to_dict(cfg)), **environment_params(env)})
        tracker.log_text(dump(cfg), "config.yaml")
        tracker.log_text(job.plan_text, "sharding_plan.txt")
        tracker.log_text(job.plan_json, "sharding_plan.json")

    def save(epoch: int, batch: int) -> None:
        if cfg.checkpoint.dir:
            position = {**state, "epoch": epoch, "batch": batch}
            checkpoint.save(job, cfg.checkpoint.dir, position, cfg.checkpoint.keep_last)

    best_model = best_model_dir(cfg, env)
    metric, throughput = cfg.train.early_stopping_metric, []
    examples_per_step = cfg.loader.batch_size * env.world_size
    for epoch in range(state["epoch"], cfg.train.epochs):
        if state["stopped"]:
            break
        batch = state["batch"] if epoch == state["epoch"] else 0
        data = TimedIterator(job.train_loader.epoch(epoch, start_batch=batch))
        with tqdm(total=len(job.train_loader), initial=batch, desc=f"epoch {epoch}", unit="batch",
                   disable=not env.is_main, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
            window_start, window_wait, window_steps, losses = time.perf_counter(), 0.0, 0, []
            while True:
                try:
                    stats = job.pipeline.progress(data)
                except StopIteration:
                    break
                state["step"] += 1
                batch += 1
                window_steps += 1
                losses.append(float(stats["loss"]))
                bar.update()
                if state["step"] % cfg.train.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    wait_share = (data.wait - window_wait) / max(elapsed, 1e-9)
                    throughput.append(window_steps * examples_per_step / elapsed)
                    values = {"train/loss": float(np.mean(losses)), "train/examples_per_s": throughput[-1],
                              "train/data_wait_share": wait_share, "train/lr_dense": cfg.optim.dense_lr,
                              "train/lr_sparse": cfg.optim.sparse_lr, "train/temperature": cfg.loss.temperature}
                    bar.set_postfix(loss=f"{values['train/loss']:.3f}", ex_s=f"{values['train/examples_per_s']:,.0f}",
                                    wait=f"{wait_share:.0%}", refresh=False)
                    if tracker:
                        tracker.log_metrics(values, state["step"])
                    window_start, window_wait, window_steps, losses = time.perf_counter(), data.wait, 0, []
                if cfg.checkpoint.every_steps and state["step"] % cfg.checkpoint.every_steps == 0:
                    save(epoch, batch)
                if cfg.train.max_steps and state["step"] >= cfg.train.max_steps:
                    state["stopped"] = True
                    break
        valid = run_eval(job, "valid")
        state["history"].append({"epoch": epoch, "step": state["step"], **valid})
        if tracker:
            tracker.log_metrics({f"valid/{k}": v for k, v in valid.items() if k not in COUNTS}, state["step"])
        if env.is_main:
            print(f"epoch {epoch} step {state['step']}: " + ", ".join(
                f"{k}={valid[k]:.4f}" for k in sorted(valid) if k.startswith(("hr@", "ndcg@", "mrr"))))
        if valid[metric] > state["best_value"]:
            state.update(best_value=valid[metric], best_epoch=epoch, patience=cfg.train.early_stopping_patience)
            state["best_test"] = run_eval(job, "test")  # kept, not looked at: reported once, for the selected epoch
            if best_model:
                checkpoint.save_model(job, best_model, {"epoch": epoch, "step": state["step"], "valid": valid})
        else:
            state["patience"] -= 1
            state["stopped"] |= state["patience"] < 0
        save(epoch + 1, 0)
    history, best_epoch = state["history"], state["best_epoch"]
    summary = {"best_epoch": best_epoch, "steps": state["step"],
               "valid": next((h for h in history if h["epoch"] == best_epoch), {}), "test": state["best_test"],
               "history": history, "sharding_plan": json.loads(job.plan_json),
               # The first window includes pipeline fill and loader start-up.
               "train_examples_per_s": float(np.median(throughput[1:] or throughput or [0.0]))}
    if cfg.eval.popularity_baseline:
        popularity = popularity_scorer(job.train_loader.catalogue.freq)
        summary["popularity_valid"] = run_eval(job, "valid", popularity)
        summary["popularity_test"] = run_eval(job, "test", popularity)
    if best_model and env.is_main:
        summary["export"] = export_best(cfg, best_model, state["run_id"], tracker)
    if tracker:
        tracker.log_metrics({f"test/{k}": v for k, v in summary["test"].items() if k not in COUNTS}, state["step"])
        if cfg.eval.popularity_baseline:
            tracker.log_metrics({f"popularity_test/{k}": v for k, v in summary["popularity_test"].items()
                                 if k not in COUNTS}, state["step"])
        tracker.log_json(eval_table(summary), "eval_table.json")
        log_plots(cfg, job.meta, summary, tracker)
    return summary


def best_model_dir(cfg: JobConfig, env: distributed.Env) -> Path | None:
    """Where the best epoch's weights are kept for export: next to the checkpoints, or else in a temp
    directory, which every rank can only write to when they share one machine."""
    if not cfg.export.enabled:
        return None
    if cfg.checkpoint.dir:
        return Path(cfg.checkpoint.dir) / BEST_MODEL
    if env.world_size > int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)):
        if env.is_main:
            log.warning("export skipped: a multi-node job keeps the best model under checkpoint.dir, on storage "
                        "every node shares; set checkpoint.dir to export")
        return None
    path = [tempfile.mkdtemp(prefix="two-tower-") if env.is_main else None]
    torch.distributed.broadcast_object_list(path, src=0)
    return Path(path[0]) / BEST_MODEL


def export_best(cfg: JobConfig, best_model: Path, run_id: str | None, tracker: Tracker | None) -> dict:
    """Rank 0: the selected epoch's model -> exports/<run id>, logged to MLflow under `export/`."""
    out = Path(cfg.export.dir) / (run_id or time.strftime("untracked-%Y%m%d-%H%M%S"))
    info = export(best_model, out, cfg, run_id=run_id)
    if not cfg.checkpoint.dir:
        shutil.rmtree(best_model.parent, ignore_errors=True)
    recall = info["index"][f"recall@{RECALL_K}"]
    print(f"exported the epoch-{info['source']['state']['epoch']} model to {out} "
          f"({cfg.export.index} index recall@{RECALL_K} against exact search: {recall:.4f})")
    if tracker:
        tracker.log_artifacts(out, "export")
        tracker.log_metrics({f"export/index_recall@{RECALL_K}": recall}, info["source"]["state"]["step"])
    return {"dir": str(out), "index": info["index"]}


def eval_table(summary: dict) -> list[dict]:
    """Rows of (split, scorer, metric, value): the final comparison, model against popularity."""
    rows = []
    for split in ("valid", "test"):
        for scorer, key in (("two_tower", split), ("popularity", f"popularity_{split}")):
            for metric, value in (summary.get(key) or {}).items():
                if metric not in ("epoch", "step"):
                    rows.append({"split": split, "scorer": scorer, "metric": metric, "value": value})
    return rows
