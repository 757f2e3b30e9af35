"""Checkpoints with torch.distributed.checkpoint (DCP), and the best epoch's weights.

A checkpoint holds every Stateful component of the job (the sharded model, the fused and dense
optimizers, the streaming frequency estimator), written by DCP, plus `state.json` (the loop state
and the RNG) and `config.yaml` (the resolved config, from which export rebuilds the model).

It is written into a hidden temporary directory and renamed to `step-<N>` only after every rank has
finished and rank 0 has written its files; `latest()` only ever returns such complete directories,
so a job killed mid-write resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from config import CheckpointConfig
from data.atomic import replace_directory
from trainer.state import LoopState

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
PREFIX = "step-"
BEST_MODEL = "best"  # the selected epoch's weights, under checkpoint.dir: what export reads


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(root: str | Path) -> Path | None:
    found = complete_checkpoints(Path(root))
    return found[-1] if found else None


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist(), "numpy": list(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]), "python": random.getstate()[1]}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def write(components: dict[str, Stateful], final: Path, files: dict[str, str]) -> None:
    """Collective. DCP writes every component into a hidden temp directory; rank 0 adds `files` and only
    then renames it to `final`."""
    tmp = final.parent / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save({name: component.state_dict() for name, component in components.items()}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        for name, text in files.items():
            (tmp / name).write_text(text)
        replace_directory(tmp, final)
    dist.barrier()


def save_model(model: Stateful, path: Path, info: dict, config_text: str) -> None:
    """Collective. Model weights only (no optimizer state), with the config that built the model: what
    export reads."""
    write({"model": model}, path, {STATE_FILE: json.dumps(info), CONFIG_FILE: config_text})


def read(components: dict[str, Stateful], path: Path, no_dist: bool = False) -> None:
    """Loads every component in place from a checkpoint, whatever world size and sharding wrote it. An
    optimizer that creates its state lazily (Adam) must have it initialised first: DCP loads into tensors."""
    items = {name: component.state_dict() for name, component in components.items()}
    with warnings.catch_warnings():  # no_dist: "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(items, checkpoint_id=str(path), no_dist=no_dist)
    for name, component in components.items():
        component.load_state_dict(items[name])


class CheckpointManager:
    """Saves and restores everything a restart needs, under `checkpoint.dir`, keeping the newest
    `keep_last`."""

    def __init__(self, cfg: CheckpointConfig, config_text: str):
        self.root = Path(cfg.dir) if cfg.dir else None
        self.keep_last, self.every_steps = cfg.keep_last, cfg.every_steps
        self.config_text = config_text

    def latest(self) -> Path | None:
        return latest(self.root) if self.root else None

    def save(self, components: dict[str, Stateful], loop: LoopState) -> Path | None:
        """Collective: every rank calls it at the same step. Nothing happens without checkpoint.dir."""
        if self.root is None:
            return None
        final = self.root / f"{PREFIX}{loop.step:09d}"
        state = {"loop": loop.to_dict(), "rng": rng_state()}
        write(components, final, {STATE_FILE: json.dumps(state), CONFIG_FILE: self.config_text})
        if dist.get_rank() == 0:
            for old in complete_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def due(self, step: int) -> bool:
        """A mid-epoch checkpoint is due at this step (checkpoint.every_steps)."""
        return bool(self.root and self.every_steps and step % self.every_steps == 0)

    def load(self, components: dict[str, Stateful], path: Path) -> LoopState:
        """Restores the components in place and the RNG; returns the loop state saved with them."""
        read(components, path)
        state = read_state(path)
        restore_rng(state["rng"])
        return LoopState.from_dict(state["loop"])


def local_tensors(state: dict) -> dict[str, list[torch.Tensor]]:
    """The tensors this rank holds of a state dict: each sharded tensor's local shards, or the tensor."""
    return {key: [shard.tensor for shard in value.local_shards()] if hasattr(value, "local_shards") else [value]
            for key, value in state.items() if hasattr(value, "local_shards") or isinstance(value, torch.Tensor)}


class BestWeights:
    """The selected epoch's model weights: kept at each improvement, restored for the one test
    evaluation, and what export reads. On disk (DCP) under `directory` (checkpoint.dir/best), or in a
    temporary directory when every rank runs on one machine; otherwise (a multi-node job without
    checkpoint.dir) each rank keeps a copy of its own shards in memory, and there is nothing to export."""

    def __init__(self, directory: Path | None, config_text: str, on_one_machine: bool):
        self.directory, self.config_text = directory, config_text
        self.temporary = directory is None and on_one_machine
        self.snapshot: dict[str, list[torch.Tensor]] | None = None

    def keep(self, model: Stateful, info: dict) -> None:
        """Collective."""
        if self.directory is None and self.temporary:
            path = [tempfile.mkdtemp(prefix="two-tower-") if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(path, src=0)
            self.directory = Path(path[0]) / BEST_MODEL
        if self.directory is not None:
            save_model(model, self.directory, info, self.config_text)
        else:
            self.snapshot = {k: [t.detach().clone() for t in ts] for k, ts in local_tensors(model.state_dict()).items()}

    def restore(self, model: Stateful) -> None:
        """Collective. Puts the kept weights back into `model`."""
        if self.directory is not None:
            read({"model": model}, self.directory)
            return
        with torch.no_grad():
            for key, tensors in local_tensors(model.state_dict()).items():
                for target, saved in zip(tensors, self.snapshot[key]):
                    target.copy_(saved)

    def cleanup(self) -> None:
        """Rank 0 removes a temporary directory once export has read it."""
        if self.temporary and self.directory is not None and dist.get_rank() == 0:
            shutil.rmtree(self.directory.parent, ignore_errors=True)
