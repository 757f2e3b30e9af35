"""Checkpoints with torch.distributed.checkpoint (DCP), on any storage, and the best epoch's weights.

A checkpoint holds every Stateful component of the job (the sharded model, the fused and dense
optimizers, the streaming frequency estimator), written by DCP, plus `config.yaml` (the resolved
config, from which export rebuilds the model) and `state.json`: the loop state, the RNG, the world size
and the data's checksum. `checkpoint.dir` is a local path or a URI (s3://, gs://, hdfs://): DCP writes
through its filesystem storage locally and through its fsspec storage elsewhere.

It is committed by storage/commit.py: rank 0 writes the manifest (every file's size and SHA-256) only
after every rank has finished, so a job killed mid-write never resumes from it. Before resuming, the
newest checkpoint is verified against its manifest; one that does not verify (truncated, overwritten,
unreadable) is skipped, with the reason, for the newest that does. A checkpoint written with another
config is refused, naming the keys (see `compatibility`).
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import warnings
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import towers
from config import CheckpointConfig, ConfigError, JobConfig, flatten, load_config_text, to_dict
from config.job import POSITION, SAFE, SHAPE, resume_rules
from storage import Location, StorageError, committed, location
from storage import commit as storage_commit
from storage import verify as verify_files
from trainer.state import LoopState

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
PREFIX = "step-"
BEST_MODEL = "best"  # best-<step>: the selected epoch's weights, under checkpoint.dir: what export reads
# What a resume may change: each config field's rule, marked beside it in config/job.py.
RESUME_RULES = resume_rules(JobConfig)
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed from, or the best weights cannot be read back."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


KIND = "checkpoint"


def checkpoint_id(where: Location) -> str:
    """What DCP is given: a local path (its filesystem storage) or a URI (its fsspec storage)."""
    return str(where.local_path) if where.is_local else where.uri


def step_directories(root: Location) -> list[Location]:
    found = [p for p in root.children() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def complete_checkpoints(root: "str | Location") -> list[Location]:
    """The committed checkpoints under `root`, oldest first."""
    return [p for p in step_directories(location(root)) if committed(p)]


def latest(root: "str | Location") -> Location | None:
    found = complete_checkpoints(location(root))
    return found[-1] if found else None


def read_state(path: "str | Location") -> dict:
    return json.loads((location(path) / STATE_FILE).read_text())


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist(), "numpy": list(np.random.get_state()[1].tolist()),
            "numpy_pos": int(np.random.get_state()[2]), "python": random.getstate()[1]}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


def verify(path: "str | Location") -> str | None:
    """Why the checkpoint at `path` cannot be trusted, or None when every file has its recorded size and SHA-256."""
    try:
        return verify_files(location(path))
    except StorageError as err:
        return err.problem


def write(components: dict[str, Stateful], final: Location, config_text: str, state: dict) -> None:
    """Collective. DCP writes every component into the staging location (a hidden sibling directory locally,
    the final prefix on an object store); rank 0 adds the config and the state, then commits: the manifest,
    last, and locally the rename."""
    staging = [None]
    if dist.get_rank() == 0:
        staging[0] = storage_commit.begin(final, KIND)
    where = [staging[0].location.uri if staging[0] else None]
    dist.broadcast_object_list(where, src=0)
    dcp.save({name: component.state_dict() for name, component in components.items()},
             checkpoint_id=checkpoint_id(location(where[0])))
    dist.barrier()
    if dist.get_rank() == 0:
        staging[0].write_text(CONFIG_FILE, config_text)
        staging[0].write_text(STATE_FILE, json.dumps(state))
        staging[0].record_written()
        storage_commit.commit(staging[0])
    dist.barrier()


def save_model(model: Stateful, path: Location, info: dict, config_text: str) -> None:
    """Collective. Model weights only (no optimizer state), with the config that built the model: what
    export reads."""
    write({"model": model}, path, config_text, info)


def read(components: dict[str, Stateful], path: "str | Location", no_dist: bool = False) -> None:
    """Loads every component in place from a checkpoint, whatever world size and sharding wrote it. An
    optimizer that creates its state lazily (Adam) must have it initialised first: DCP loads into tensors."""
    items = {name: component.state_dict() for name, component in components.items()}
    with warnings.catch_warnings():  # no_dist: "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(items, checkpoint_id=checkpoint_id(location(path)), no_dist=no_dist)
    for name, component in components.items():
        component.load_state_dict(items[name])


def remove_incomplete(root: Location) -> None:
    """What a killed job left: uncommitted step directories (object stores) and the temporaries of dead
    writers (local disks). Nothing reads them; this frees the space."""
    for path in step_directories(root):
        if not committed(path):
            log.warning("removing the incomplete checkpoint %s (its write never finished)", path)
            path.remove()
    for path in root.children():
        pid = path.name.rsplit("-", 1)[-1]
        if path.is_local and path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name) \
                and pid.isdigit() and not storage_commit.pid_alive(int(pid)):
            path.remove()


def resume_point(root: Location | None) -> Location | None:
    """Collective. The newest checkpoint under `root` that verifies; those that do not are skipped, with the
    reason. An error when there are checkpoints but none verifies: starting over silently would lose them."""
    if root is None:
        return None
    choice: list = [None]
    if dist.get_rank() == 0:
        skipped = []
        try:
            remove_incomplete(root)
            found = complete_checkpoints(root)
        except StorageError as err:
            found, choice[0] = [], CheckpointError(f"cannot list checkpoint.dir: {err}")
        for path in reversed(found):
            reason = verify(path)
            if reason is None:
                choice[0] = path.uri
                break
            skipped.append(f"{path.name}: {reason}")
            log.warning("skipping checkpoint %s: %s", path, reason)
        if choice[0] is None and skipped:
            choice[0] = CheckpointError(f"no checkpoint under {root} verifies ({'; '.join(skipped)}); move them "
                                        f"away to start over")
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    return location(choice[0]) if choice[0] else None


def rule(key: str) -> str:
    """The resume rule of a flattened config key (config/job.py), "" for none; `section.` rules cover its keys."""
    return next((kind for pattern, kind in RESUME_RULES.items()
                 if key == pattern or (pattern.endswith(".") and key.startswith(pattern))), "")


def compatibility(saved: JobConfig, current: JobConfig, saved_world: int, world: int, at_epoch_start: bool,
                  path: Location) -> list[str]:
    """The changes a resume makes, as `key: old -> new` lines; raises ConfigError for any it may not make."""
    old, new = flatten(to_dict(towers.resolve(saved))), flatten(to_dict(towers.resolve(current)))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    allowed = current.checkpoint.allow_changes
    problems, notes = [], []
    for key in changed:
        line = f"{key}: {old.get(key)} -> {new.get(key)}"
        if rule(key) == SAFE:
            notes.append(line)
        elif rule(key) == SHAPE:
            problems.append(f"{line} (changes the checkpoint's tensors: start a new checkpoint.dir)")
        elif key not in allowed:
            problems.append(f"{line} (allow it with checkpoint.allow_changes=[{key}])")
        elif rule(key) == POSITION and not at_epoch_start:
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
        self.root = location(cfg.dir) if cfg.dir else None
        self.keep_last, self.every_steps = cfg.keep_last, cfg.every_steps
        self.config_text, self.world_size, self.data = config_text, world_size, data_checksum

    def save(self, components: dict[str, Stateful], loop: LoopState) -> Location | None:
        """Collective: every rank calls it at the same step. Nothing happens without checkpoint.dir."""
        if self.root is None:
            return None
        final = self.root / f"{PREFIX}{loop.step:09d}"
        state = {"loop": loop.to_dict(), "rng": rng_state(), "world_size": self.world_size, "data": self.data}
        write(components, final, self.config_text, state)
        if dist.get_rank() == 0:
            for old in complete_checkpoints(self.root)[:-self.keep_last]:
                (old / storage_commit.MANIFEST_FILE).remove()  # no longer complete before anything else goes
                old.remove()
        dist.barrier()
        return final

    def due(self, step: int) -> bool:
        """A mid-epoch checkpoint is due at this step (checkpoint.every_steps)."""
        return bool(self.root and self.every_steps and step % self.every_steps == 0)

    def check(self, path: "str | Location", cfg: JobConfig) -> list[str]:
        """What resuming from `path` with `cfg` changes (ConfigError for a change it may not make)."""
        path = location(path)
        state = read_state(path)
        if state["data"] != self.data:
            raise ConfigError(f"cannot resume from {path}: the prepared data at {cfg.data.path} is not the data it was "
                              f"trained on (checksum and size {self.data} against {state['data']})")
        saved = load_config_text((path / CONFIG_FILE).read_text(), str(path / CONFIG_FILE))
        loop = LoopState.from_dict(state["loop"])
        return compatibility(saved, cfg, state["world_size"], self.world_size, loop.batch == 0, path)

    def load(self, components: dict[str, Stateful], path: Location) -> LoopState:
        """Restores the components in place and the RNG; returns the loop state saved with them."""
        read(components, path)
        state = read_state(path)
        restore_rng(state["rng"])
        return LoopState.from_dict(state["loop"])


def local_tensors(state: dict) -> dict[str, list[torch.Tensor]]:
    """The tensors this rank holds of a state dict: each sharded tensor's local shards, or the tensor."""
    return {key: [shard.tensor for shard in value.local_shards()] if hasattr(value, "local_shards") else [value]
            for key, value in state.items() if hasattr(value, "local_shards") or isinstance(value, torch.Tensor)}


def best_directories(root: Location) -> list[Location]:
    prefix = f"{BEST_MODEL}-"
    found = [p for p in root.children() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(prefix):]))


class BestWeights:
    """The selected epoch's model weights: kept at each improvement, restored for the one test evaluation, and
    what export reads. Written (DCP) to `<root>/best-<step>` under checkpoint.dir, or under a temporary local
    directory when every rank runs on one machine; the previous one is removed only once the new one is
    committed, so a job killed while writing them keeps its last best on every storage. Otherwise (a
    multi-node job without checkpoint.dir) each rank keeps a copy of its own shards in memory, and there is
    nothing to export."""

    def __init__(self, root: Location | None, config_text: str, on_one_machine: bool):
        self.root, self.config_text = root, config_text
        self.temporary = root is None and on_one_machine
        self.directory: Location | None = None
        self.snapshot: dict[str, list[torch.Tensor]] | None = None

    def keep(self, model: Stateful, info: dict) -> None:
        """Collective."""
        if self.root is None and self.temporary:
            path = [tempfile.mkdtemp(prefix="two-tower-") if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(path, src=0)
            self.root = location(path[0])
        if self.root is None:
            self.snapshot = {k: [t.detach().clone() for t in ts] for k, ts in local_tensors(model.state_dict()).items()}
            return
        target = self.root / f"{BEST_MODEL}-{info['step']:09d}"
        save_model(model, target, info, self.config_text)
        if dist.get_rank() == 0:
            for old in best_directories(self.root):
                if old != target:
                    (old / storage_commit.MANIFEST_FILE).remove()
                    old.remove()
        dist.barrier()
        self.directory = target

    def current(self) -> Location | None:
        """The kept weights: this run's last, or after a resume the newest committed under the root."""
        if self.directory is None and self.root is not None:
            found = [p for p in best_directories(self.root) if committed(p)]
            self.directory = found[-1] if found else None
        return self.directory

    def restore(self, model: Stateful) -> None:
        """Collective. Puts the kept weights back into `model`, after checking them."""
        if self.root is not None:
            directory = self.current()
            reason = [(verify(directory) if directory else f"no committed {BEST_MODEL}-<step> under {self.root}")
                      if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(reason, src=0)
            if reason[0]:
                raise CheckpointError(f"the best epoch's weights at {directory or self.root} cannot be read back: "
                                      f"{reason[0]}")
            read({"model": model}, directory)
            return
        with torch.no_grad():
            for key, tensors in local_tensors(model.state_dict()).items():
                for target, saved in zip(tensors, self.snapshot[key]):
                    target.copy_(saved)

    def cleanup(self) -> None:
        """Rank 0 removes a temporary directory once export has read it."""
        if self.temporary and self.root is not None and dist.get_rank() == 0:
            self.root.remove()
