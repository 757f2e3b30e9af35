"""Checkpoints with torch.distributed.checkpoint (DCP), and the best epoch's weights.

A checkpoint holds every Stateful component of the job (the sharded model, the fused and dense
optimizers, the streaming frequency estimator), written by DCP, plus `config.yaml` (the resolved
config, from which export rebuilds the model) and, last, `state.json`: the loop state, the RNG, the
world size, the data's checksum, and the size and SHA-256 of every other file.

It is written into a hidden temporary directory and renamed to `step-<N>` only after every rank has
finished and rank 0 has written its files, so a job killed mid-write never resumes from it. Before
resuming, the newest checkpoint is verified against its recorded sizes and checksums; one that does
not verify (truncated, overwritten, unreadable) is skipped, with the reason, for the newest that
does. A checkpoint written with another config is refused, naming the keys (see `compatibility`).
"""

from __future__ import annotations

import hashlib
import json
import logging
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

from config import CheckpointConfig, ConfigError, JobConfig, flatten, load_config, to_dict
from data.atomic import replace_directory
from trainer.state import LoopState

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
PREFIX = "step-"
BEST_MODEL = "best"  # the selected epoch's weights, under checkpoint.dir: what export reads
# Config keys a resume may change without asking: how long to train, how often to log and save, where
# to track and export. (`data.path` may move; the data's checksum is compared instead.)
SAFE_CHANGES = ("train.epochs", "train.max_steps", "train.log_every", "train.collective_timeout_s",
                "train.early_stopping_patience", "train.device", "checkpoint.dir", "checkpoint.every_steps",
                "checkpoint.keep_last",
                "checkpoint.allow_changes", "eval.batch_size", "eval.popularity_baseline", "loader.prefetch_batches",
                "data.path", "export.", "tracking.")
# Keys that change what the checkpoint's tensors are: never allowed.
SHAPE_CHANGES = ("model.", "loader.history_bags", "loader.use_user_id", "optim.sparse", "optim.dense",
                 "loss.logq", "loss.frequency", "loss.streaming_buckets")
# Keys that change what a batch position means: allowed (with checkpoint.allow_changes) at an epoch boundary only.
POSITION_CHANGES = ("loader.batch_size",)
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from, or the best weights cannot be read back."""


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digests(directory: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file of a checkpoint but state.json (which records them)."""
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def verify(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every recorded file is intact."""
    try:
        files = read_state(path)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{STATE_FILE} is unreadable or lacks checksums ({type(err).__name__}: {str(err)[:120]})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, {expected['size']} were written"
        if sha256(file) != expected["sha256"]:
            return f"{name} does not match its SHA-256 (overwritten or corrupted)"
    return None


def write(components: dict[str, Stateful], final: Path, config_text: str, state: dict) -> None:
    """Collective. DCP writes every component into a hidden temp directory; rank 0 adds the config and,
    last, the state with every file's checksum, and only then renames it to `final`."""
    tmp = final.parent / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save({name: component.state_dict() for name, component in components.items()}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / CONFIG_FILE).write_text(config_text)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "files": file_digests(tmp)}))
        replace_directory(tmp, final)
    dist.barrier()


def save_model(model: Stateful, path: Path, info: dict, config_text: str) -> None:
    """Collective. Model weights only (no optimizer state), with the config that built the model: what
    export reads."""
    write({"model": model}, path, config_text, info)


def read(components: dict[str, Stateful], path: Path, no_dist: bool = False) -> None:
    """Loads every component in place from a checkpoint, whatever world size and sharding wrote it. An
    optimizer that creates its state lazily (Adam) must have it initialised first: DCP loads into tensors."""
    items = {name: component.state_dict() for name, component in components.items()}
    with warnings.catch_warnings():  # no_dist: "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(items, checkpoint_id=str(path), no_dist=no_dist)
    for name, component in components.items():
        component.load_state_dict(items[name])


def resume_point(root: Path | None) -> Path | None:
    """Collective. The newest checkpoint under `root` that verifies; those that do not are skipped, with the
    reason. An error when there are checkpoints but none verifies: starting over silently would lose them."""
    if root is None:
        return None
    choice: list = [None]
    if dist.get_rank() == 0:
        skipped = []
        for path in reversed(complete_checkpoints(root)):
            reason = verify(path)
            if reason is None:
                choice[0] = str(path)
                break
            skipped.append(f"{path.name}: {reason}")
            log.warning("skipping checkpoint %s: %s", path, reason)
        if choice[0] is None and skipped:
            choice[0] = CheckpointError(f"no checkpoint under {root} verifies ({'; '.join(skipped)}); move them "
                                        f"away to start over")
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    return Path(choice[0]) if choice[0] else None


def matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def compatibility(saved: JobConfig, current: JobConfig, saved_world: int, world: int, at_epoch_start: bool,
                  path: Path) -> list[str]:
    """The changes a resume makes, as `key: old -> new` lines; raises ConfigError for any it may not make."""
    old, new = flatten(to_dict(saved)), flatten(to_dict(current))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    allowed = current.checkpoint.allow_changes
    problems, notes = [], []
    for key in changed:
        line = f"{key}: {old.get(key)} -> {new.get(key)}"
        if matches(key, SAFE_CHANGES):
            notes.append(line)
        elif matches(key, SHAPE_CHANGES):
            problems.append(f"{line} (changes the checkpoint's tensors: start a new checkpoint.dir)")
        elif key not in allowed:
            problems.append(f"{line} (allow it with checkpoint.allow_changes=[{key}])")
        elif matches(key, POSITION_CHANGES) and not at_epoch_start:
            problems.append(f"{line} (changes what the saved batch position means: resume from an epoch-end "
                            f"checkpoint)")
        else:
            notes.append(line)
    if world != saved_world:
        line = f"world size: {saved_world} -> {world}"
        if at_epoch_start:
            notes.append(line)
        else:
            problems.append(f"{line} (the checkpoint stopped mid-epoch, and each rank's share of the epoch depends "
                            f"on the world size: resume with {saved_world} processes, or from an epoch-end "
                            f"checkpoint)")
    if problems:
        raise ConfigError(f"cannot resume from {path} with this config: " + "; ".join(problems))
    return notes


class CheckpointManager:
    """Saves and restores everything a restart needs, under `checkpoint.dir`, keeping the newest
    `keep_last`."""

    def __init__(self, cfg: CheckpointConfig, config_text: str, world_size: int, data_checksum: dict):
        self.root = Path(cfg.dir) if cfg.dir else None
        self.keep_last, self.every_steps = cfg.keep_last, cfg.every_steps
        self.config_text, self.world_size, self.data = config_text, world_size, data_checksum

    def save(self, components: dict[str, Stateful], loop: LoopState) -> Path | None:
        """Collective: every rank calls it at the same step. Nothing happens without checkpoint.dir."""
        if self.root is None:
            return None
        final = self.root / f"{PREFIX}{loop.step:09d}"
        state = {"loop": loop.to_dict(), "rng": rng_state(), "world_size": self.world_size, "data": self.data}
        write(components, final, self.config_text, state)
        if dist.get_rank() == 0:
            for old in complete_checkpoints(self.root)[:-self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def due(self, step: int) -> bool:
        """A mid-epoch checkpoint is due at this step (checkpoint.every_steps)."""
        return bool(self.root and self.every_steps and step % self.every_steps == 0)

    def check(self, path: Path, cfg: JobConfig) -> list[str]:
        """What resuming from `path` with `cfg` changes (ConfigError for a change it may not make)."""
        state = read_state(path)
        if state["data"] != self.data:
            raise ConfigError(f"cannot resume from {path}: the prepared data at {cfg.data.path} is not the data it was "
                              f"trained on (checksum and size {self.data} against {state['data']})")
        saved = load_config(path / CONFIG_FILE)
        loop = LoopState.from_dict(state["loop"])
        return compatibility(saved, cfg, state["world_size"], self.world_size, loop.batch == 0, path)

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
        """Collective. Puts the kept weights back into `model`, after checking them."""
        if self.directory is not None:
            reason = [verify(self.directory) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(reason, src=0)
            if reason[0]:
                raise CheckpointError(f"the best epoch's weights at {self.directory} cannot be read back: {reason[0]}")
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
