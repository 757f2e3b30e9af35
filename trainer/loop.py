"""The training job as a `Trainer` built from components (trainer/assembly.py): the data, the sharded
model, a checkpoint manager, the best epoch's weights and a metrics logger. Its `fit` is the story:

    resume -> per epoch (train the epoch, validate, select / stop early, keep the best weights)
           -> finalize (test once on the best weights, popularity baseline, export, plots)

The same code serves dev mode (one process, no launcher) and torchrun/torchx (one process per
rank): only the environment differs. Rank 0 logs; the other ranks hold a `NullLogger`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import re
import sys
import time
from typing import Iterator

import numpy as np
import torch
import torchrec
from tqdm import tqdm

import towers
from config import JobConfig, dump, flatten, to_dict
from data.catalogue import example_history
from data.schema import Metadata
from serving.format import RECALL_K
from serving.runs import EXPORT_ARTIFACT
from storage import Location, location
from trainer import distributed
from trainer.assembly import JobData, ShardedModel, build_data, build_model, check_runtime
from trainer.checkpointing.best import BestWeights
from trainer.checkpointing.checkpoint import read_state, resume_point
from trainer.checkpointing.manager import CheckpointManager
from trainer.checkpointing.state import LoopState
from trainer.evaluate import evaluate, popularity_scorer
from trainer.export.artifact import export
from trainer.tracking import run_info
from trainer.tracking.logger import MetricsLogger, NullLogger
from trainer.tracking.mlflow_logger import MlflowLogger

COUNTS = ("users", "skipped")  # evaluation counts, not metrics
NOTE = "mlflow.note.content"  # the run's description in the UI
# What gloo and NCCL say when a collective outlives the process group's timeout (train.collective_timeout_s).
COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting|Application timeout caused pair closure|Watchdog caught collective "
                                r"operation timeout|timed out after", re.IGNORECASE)
log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a collective that timed out); the message names the step or rank."""


def collective_timeout(err: BaseException, env: distributed.Env, timeout_s: int) -> TrainingError | None:
    """A backend's timeout as one line naming this rank and the setting, or None for any other error."""
    text = str(err).strip()
    if env.world_size < 2 or not isinstance(err, RuntimeError) or not COLLECTIVE_TIMEOUT.search(text):
        return None
    backend = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(err).__name__)
    return TrainingError(f"rank {env.rank}: a collective operation waited train.collective_timeout_s={timeout_s} s "
                         f"for the other ranks and gave up: one of them stalled or died (its log says which; raise "
                         f"train.collective_timeout_s if a step may legitimately take longer) (backend: {backend})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class TimedIterator:
    """Counts the time the training loop spends waiting for data, and the padding of sequence batches (the
    positions their causal stack computes, and the real items among them)."""

    def __init__(self, source: Iterator):
        self.source = source
        self.wait = 0.0
        self.computed = self.real = 0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            batch = next(self.source)
        finally:
            self.wait += time.perf_counter() - start
        if hasattr(batch, "stack_positions"):
            computed, real = batch.stack_positions()
            self.computed += computed
            self.real += real
        return batch


class Window:
    """Loss, throughput and data-wait share over the steps since the last log line. An example is a trained
    target: a real row of a bags batch, a position of a transformer batch. The per-step losses stay on the
    device and are read back in one transfer (`checked_losses`) at a log line, a checkpoint or the epoch's end:
    a host sync per step would stall a GPU's queue."""

    def __init__(self, data: TimedIterator):
        self.data, self.start, self.wait = data, time.perf_counter(), data.wait
        self.computed, self.real = data.computed, data.real
        self.losses: list[torch.Tensor] = []
        self.examples: list[torch.Tensor] = []
        self.steps: list[tuple[int, int, int]] = []  # (step, epoch, batch) of each loss
        self.checked = 0

    def add(self, stats: dict[str, torch.Tensor], step: int, epoch: int, batch: int) -> None:
        self.losses.append(stats["loss"].reshape(()))
        self.examples.append(stats["examples"].reshape(()))
        self.steps.append((step, epoch, batch))

    def checked_losses(self, rank: int) -> np.ndarray:
        """The window's losses; the first non-finite one since the last check raises, naming its step."""
        losses = torch.stack(self.losses).float().cpu().numpy() if self.losses else np.zeros(0)
        bad = np.flatnonzero(~np.isfinite(losses[self.checked:]))
        if len(bad):
            step, epoch, batch = self.steps[self.checked + bad[0]]
            raise TrainingError(f"the loss is {losses[self.checked + bad[0]]} at step {step} (epoch {epoch}, batch "
                                f"{batch}) on rank {rank}. The batch's ids were validated when read, so this is not "
                                f"bad input data: the weights diverged (lower optim.sparse_lr or optim.dense_lr, or "
                                f"raise loss.temperature) or were loaded corrupted")
        self.checked = len(losses)
        return losses

    def metrics(self, world_size: int, rank: int) -> dict[str, float]:
        losses = self.checked_losses(rank)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        examples = float(torch.stack(self.examples).sum()) if self.examples else 0.0
        values = {"train/loss": float(np.mean(losses)) if len(losses) else float("nan"),
                  "train/examples_per_s": examples * world_size / elapsed,
                  "train/data_wait_share": (self.data.wait - self.wait) / elapsed}
        computed = self.data.computed - self.computed
        if computed:  # sequence batches: the share of the stack's positions that were padding (this rank's)
            values["train/padding_share"] = 1.0 - (self.data.real - self.real) / computed
        return values


def plan_summary(plan_json: str, world_size: int) -> str:
    """One line for the console; the whole plan is in the run (sharding_plan.txt) and under --verbose."""
    tables = json.loads(plan_json)
    kinds = sorted({spec["sharding_type"] for spec in tables.values()})
    return (f"sharding plan: {len(tables)} tables, {', '.join(kinds)}, over {world_size} "
            f"rank{'s' if world_size > 1 else ''} (the whole plan: --verbose, or sharding_plan.txt in the run)")


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


def environment_params(env: distributed.Env) -> dict[str, str]:
    commit = run_info.git("rev-parse", "HEAD") or "unknown"
    return {"env.world_size": str(env.world_size), "env.device": str(env.device), "env.backend": env.backend,
            "env.torch": torch.__version__, "env.torchrec": torchrec.__version__,
            "env.python": platform.python_version(), "env.git_commit": commit}


def eval_table(summary: dict) -> list[dict]:
    """Rows of (split, scorer, metric, value): the final comparison, model against popularity."""
    rows = []
    for split in ("valid", "test"):
        for scorer, key in (("two_tower", split), ("popularity", f"popularity_{split}")):
            for metric, value in (summary.get(key) or {}).items():
                if metric not in ("epoch", "step"):
                    rows.append({"split": split, "scorer": scorer, "metric": metric, "value": value})
    return rows


class Trainer:
    def __init__(self, cfg: JobConfig, env: distributed.Env, data: JobData, model: ShardedModel,
                 logger: MetricsLogger, checkpoints: CheckpointManager, best: BestWeights):
        self.cfg, self.env, self.data, self.model, self.logger = cfg, env, data, model, logger
        self.checkpoints, self.best = checkpoints, best
        self.throughput: list[float] = []

    def fit(self, resume: Location | None = None) -> dict:
        state = self.start(resume)
        for epoch in range(state.epoch, self.cfg.train.epochs):
            if state.stopped:
                break
            state.epoch = epoch
            self.train_epoch(state)
            valid = self.evaluate("valid")
            self.record(state, valid)
            if state.select(epoch, valid[self.cfg.train.early_stopping_metric], self.cfg.train.early_stopping_patience):
                self.best.keep(self.model.dmp, {"epoch": epoch, "step": state.step, "valid": valid})
            elif self.cfg.optim.plateau_decay < 1 and not state.stopped:
                self.decay_learning_rates(state)
            state.epoch, state.batch = epoch + 1, 0
            self.checkpoints.save(self.model.stateful(), state)
        return self.finalize(state)

    def start(self, resume: Location | None) -> LoopState:
        """A fresh loop state, or the one of the checkpoint to resume (model and optimizers restored)."""
        if self.env.is_main:
            log.info("sharding plan:\n%s", self.model.plan_text)
            print(plan_summary(self.model.plan_json, self.env.world_size))
            print(protocol_summary(self.cfg, self.data.meta))
        run_id = [self.logger.run_id]
        torch.distributed.broadcast_object_list(run_id, src=0)  # every rank keeps it with each checkpoint
        if resume is None:
            self.logger.log_params({**flatten(to_dict(self.cfg)), **environment_params(self.env)})
            self.logger.set_tags({NOTE: run_info.description(self.cfg, self.data.meta, self.env.world_size,
                                                             str(self.env.device))})
            self.logger.log_dataset(run_info.dataset(self.cfg, self.data.meta))
            self.logger.log_text(dump(self.cfg), "config.yaml")
            self.logger.log_text(self.model.plan_text, "sharding_plan.txt")
            self.logger.log_text(self.model.plan_json, "sharding_plan.json")
            return LoopState(run_id=run_id[0])
        changes = self.checkpoints.check(resume, self.cfg)
        self.model.dense_optimizer.init_state()  # Adam creates its state lazily; DCP loads into tensors
        state = self.checkpoints.load(self.model.stateful(), resume)
        # The configured rates (a resume may change them) times the decay so far, whatever the optimizers saved.
        self.model.scale_learning_rates(self.cfg.optim, state.lr_scale)
        if self.env.is_main:
            print(f"resumed from {resume} at epoch {state.epoch}, batch {state.batch}, step {state.step}"
                  + (f", with changes: {'; '.join(changes)}" if changes else ""))
        if changes:
            self.logger.log_text("\n".join(changes) + "\n", f"resumes/step-{state.step:09d}.txt")
        return state

    def train_epoch(self, state: LoopState) -> None:
        """Steps through the rest of epoch `state.epoch`, logging every train.log_every steps and
        checkpointing every checkpoint.every_steps; train.max_steps ends training."""
        cfg, loader = self.cfg, self.data.train_loader
        data = TimedIterator(loader.epoch(state.epoch, start_batch=state.batch))
        window = Window(data)
        with tqdm(total=len(loader), initial=state.batch, desc=f"epoch {state.epoch}", unit="batch",
                  disable=not self.env.is_main, mininterval=0.5 if sys.stderr.isatty() else 30) as bar:
            while True:
                try:
                    stats = self.model.pipeline.progress(data)
                except StopIteration:
                    break
                state.step += 1
                state.batch += 1
                window.add(stats, state.step, state.epoch, state.batch - 1)
                bar.update()
                if state.step % cfg.train.log_every == 0:
                    values = window.metrics(self.env.world_size, self.env.rank)
                    self.throughput.append(values["train/examples_per_s"])
                    padding = {"pad": f"{values['train/padding_share']:.0%}"} if "train/padding_share" in values else {}
                    bar.set_postfix(loss=f"{values['train/loss']:.3f}", ex_s=f"{values['train/examples_per_s']:,.0f}",
                                    wait=f"{values['train/data_wait_share']:.0%}", **padding, refresh=False)
                    self.logger.log_metrics(values, state.step)
                    window = Window(data)
                if self.checkpoints.due(state.step):
                    window.checked_losses(self.env.rank)  # never checkpoint diverged weights
                    self.checkpoints.save(self.model.stateful(), state)
                if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                    state.stopped = True
                    break
        window.checked_losses(self.env.rank)  # before validation reads the weights

    def evaluate(self, split: str, scorer=None) -> dict[str, float]:
        """Full-catalogue metrics of `split`, with the current weights unless another scorer is given."""
        self.model.pipeline.detach()
        self.model.dmp.eval()
        metrics = evaluate(scorer or self.model.scorer(self.data, self.env.device),
                           self.data.eval_loaders[split].epoch(0), self.cfg.eval.ks, self.data.meta.num_items,
                           self.env.device, self.cfg.eval.filter_seen)
        self.model.dmp.train()
        return metrics

    def decay_learning_rates(self, state: LoopState) -> None:
        """optim.plateau_decay: after an epoch without a validation gain, both rates shrink by that factor."""
        state.lr_scale *= self.cfg.optim.plateau_decay
        self.model.scale_learning_rates(self.cfg.optim, state.lr_scale)
        if self.env.is_main:
            optim, scale = self.cfg.optim, state.lr_scale
            print(f"epoch {state.epoch}: no validation gain, learning rates now x{scale:g} "
                  f"(sparse {optim.sparse_lr * scale:g}, dense {optim.dense_lr * scale:g})")

    def record(self, state: LoopState, valid: dict[str, float]) -> None:
        """The epoch's validation metrics, with the learning-rate scale it trained at."""
        state.history.append({"epoch": state.epoch, "step": state.step, "lr_scale": state.lr_scale, **valid})
        decaying = {"train/lr_scale": state.lr_scale} if self.cfg.optim.plateau_decay < 1 else {}  # else a constant
        self.logger.log_metrics({**{f"valid/{k}": v for k, v in valid.items() if k not in COUNTS}, **decaying},
                                state.step)
        if self.env.is_main:
            print(f"epoch {state.epoch} step {state.step}: " + ", ".join(
                f"{k}={valid[k]:.4f}" for k in sorted(valid) if k.startswith(("hr@", "ndcg@", "mrr"))))

    def finalize(self, state: LoopState) -> dict:
        """Test once, on the selected epoch's weights; the popularity baseline; export, plots, tables."""
        cfg = self.cfg
        self.best.restore(self.model.dmp)
        summary = {"best_epoch": state.best_epoch, "steps": state.step,
                   "valid": next((h for h in state.history if h["epoch"] == state.best_epoch), {}),
                   "test": self.evaluate("test"), "history": state.history,
                   "sharding_plan": json.loads(self.model.plan_json),
                   # The first window includes pipeline fill and loader start-up.
                   "train_examples_per_s": float(np.median(self.throughput[1:] or self.throughput or [0.0]))}
        if cfg.eval.popularity_baseline:
            popularity = popularity_scorer(self.data.train_loader.catalogue.freq)
            summary["popularity_valid"] = self.evaluate("valid", popularity)
            summary["popularity_test"] = self.evaluate("test", popularity)
        if self.env.is_main and cfg.export.enabled:
            if self.best.current() is not None:
                summary["export"] = self.export(state.run_id, summary["test"])
                summary["example_history"] = example_history(cfg.data.path, self.data.meta)
            else:
                log.warning("export skipped: a multi-node job keeps the best model under checkpoint.dir, on storage "
                            "every node shares; set checkpoint.dir to export")
        self.log_result(summary, state)
        self.logger.log_images(lambda: draw_plots(cfg, self.data.meta, summary))
        self.best.cleanup()
        return summary

    def log_result(self, summary: dict, state: LoopState) -> None:
        """The headline first: `best/*` sorts before every other metric group in the UI."""
        metric = self.cfg.train.early_stopping_metric
        best = {"best/epoch": state.best_epoch, f"best/valid_{metric}": state.best_value}
        best.update({f"best/test_{k}": v for k, v in summary["test"].items() if k not in COUNTS})
        self.logger.log_metrics(best, state.step)
        if self.cfg.eval.popularity_baseline:
            self.logger.log_metrics({f"popularity_test/{k}": v for k, v in summary["popularity_test"].items()
                                     if k not in COUNTS}, state.step)
        note = run_info.description(self.cfg, self.data.meta, self.env.world_size, str(self.env.device))
        self.logger.set_tags({"best_epoch": state.best_epoch, NOTE: note + run_info.result(summary, metric)})
        self.logger.log_table(eval_table(summary), "eval_table.json")

    def export(self, run_id: str | None, test: dict[str, float]) -> dict:
        """Rank 0: the selected epoch's model -> <export.dir>/<run id>, logged to MLflow under `export/` and as the
        run's model, with its test metrics linked to it."""
        out = location(self.cfg.export.dir) / (run_id or time.strftime("untracked-%Y%m%d-%H%M%S"))
        manifest = export(self.best.current(), out, self.cfg, run_id=run_id)
        recall = manifest.index[f"recall@{RECALL_K}"]
        print(f"exported the epoch-{manifest.source['state']['epoch']} model to {out} "
              f"({self.cfg.export.index} index recall@{RECALL_K} against exact search: {recall:.4f})")
        self.logger.log_artifacts(out, EXPORT_ARTIFACT)
        step = manifest.source["state"]["step"]
        linked = {f"best/test_{k}": v for k, v in test.items() if k not in COUNTS}
        self.logger.log_model(out, self.cfg.tracking.register_as, linked, step)
        self.logger.log_metrics({f"export/index_recall@{RECALL_K}": recall}, manifest.source["state"]["step"])
        return {"dir": str(out), "index": manifest.index}


def draw_plots(cfg: JobConfig, meta: Metadata, summary: dict) -> dict:
    """The run's plots, importing matplotlib only on the rank that tracks, when it draws them."""
    from trainer.tracking.plots import plots

    return plots(cfg, meta, summary)


def build(cfg: JobConfig, env: distributed.Env, logger: MetricsLogger | None = None) -> Trainer:
    """The Trainer and its components; collective (every rank builds the same plan)."""
    seed_everything(cfg.seed)
    meta = Metadata.load(cfg.data.path)
    check_runtime(cfg, env.device, meta)
    data = build_data(cfg, env, meta)
    model = build_model(cfg, env, meta, data.train_loader.catalogue.freq, data.train_loader.negatives)
    config_text = dump(cfg)
    data_checksum = {"checksum": meta.source.get("checksum"), "train_examples": meta.counts["train_examples"]}
    checkpoints = CheckpointManager(cfg.checkpoint, config_text, env.world_size, data_checksum)
    best = BestWeights(location(cfg.checkpoint.dir) if cfg.checkpoint.dir else None, config_text,
                       on_one_machine=env.world_size <= int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    return Trainer(cfg, env, data, model, logger or NullLogger(), checkpoints, best)


def train(cfg: JobConfig, config_path: str | None = None) -> dict:
    """The whole job; `config_path` names the run (and its source tag) after the config file."""
    towers.resolve(cfg)  # the tower's section typed and checked before any work, and logged as resolved
    env = distributed.init(cfg.train.device, cfg.train.collective_timeout_s)
    resume = resume_point(location(cfg.checkpoint.dir) if cfg.checkpoint.dir else None)
    run_id = read_state(resume)["loop"]["run_id"] if resume else None
    logger = NullLogger()
    if cfg.tracking.enabled and env.is_main:
        logger = MlflowLogger(cfg.tracking, run_id, run_info.run_name(cfg, config_path),
                              run_info.source_tags(config_path))
    try:
        summary = build(cfg, env, logger).fit(resume)
    except BaseException as err:
        logger.finish("FAILED")
        named = collective_timeout(err, env, cfg.train.collective_timeout_s)
        if named is not None:
            raise named from None
        raise
    if logger.run_id:
        summary["run_id"], summary["experiment_id"] = logger.run_id, logger.experiment_id
        summary["tracking_outbox"] = logger.finish("FINISHED")  # None: the run's record is complete
    return summary
