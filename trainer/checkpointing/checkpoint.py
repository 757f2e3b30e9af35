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
config is refused, naming the keys (see `compatibility`)."""

from __future__ import annotations

import json
import logging
import random
import warnings
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from storage import Location, StorageError, committed, location
from storage import commit as storage_commit
from storage import verify as verify_files

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
PREFIX = "step-"
BEST_MODEL = "best"  # best-<step>: the selected epoch's weights, under checkpoint.dir: what export reads
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
        try:
            dcp.load(items, checkpoint_id=checkpoint_id(location(path)), no_dist=no_dist)
        except CheckpointException as error:
            missing = missing_tensor(error)
            if missing is None:
                raise
            raise CheckpointError(f"{path} has no tensor '{missing}', which this model has: the checkpoint was written "
                                  f"by another version of the model's code or another model config; resume with "
                                  f"that version, or start a new checkpoint.dir") from None
    for name, component in components.items():
        component.load_state_dict(items[name])


# What DCP's default load planner raises, per rank, for a tensor of the model that the checkpoint lacks.
MISSING_TENSOR = "Missing key in checkpoint state_dict: "


def missing_tensor(error: CheckpointException) -> str | None:
    """The first tensor a failed load found missing from the checkpoint, or None if it failed otherwise. DCP's
    CheckpointException is a BaseException holding each rank's (exception, traceback)."""
    for failure in error.failures.values():
        message = str(failure[0] if isinstance(failure, tuple) else failure)
        if message.startswith(MISSING_TENSOR):
            return message[len(MISSING_TENSOR):].rstrip(".")
    return None


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
