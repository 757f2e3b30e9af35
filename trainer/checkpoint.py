"""Checkpoints with torch.distributed.checkpoint: sharded model, fused and dense optimizer state,
plus the loop's position, RNG, frequency-estimator state, the MLflow run id and the resolved config.

A checkpoint is written into a hidden temporary directory and renamed to `step-<N>` only after
every rank has finished and rank 0 has written `state.json`; `latest()` only ever returns such
complete directories, so a job killed mid-write resumes from the previous checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.config import dump

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"  # the resolved job config: export rebuilds the model from it
PREFIX = "step-"


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


def stateful(job) -> dict:
    """Everything DCP saves and loads in place: it must be rebuilt the same way on load."""
    items = {"model": job.dmp.state_dict(), "fused_optimizer": job.dmp.fused_optimizer.state_dict(),
             "dense_optimizer": job.dense_optimizer.state_dict()}
    estimator = job.streaming_frequency
    if estimator is not None:
        items["frequency"] = {"last_step": estimator.last_step, "gap": estimator.gap}
    return items


def write_atomically(items: dict, final: Path, files: dict[str, str]) -> None:
    """Collective. DCP writes into a hidden temp directory; rank 0 adds `files` and only then renames it
    to `final`, so a reader never sees a half-written directory under that name."""
    tmp = final.parent / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    dcp.save(items, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        for name, text in files.items():
            (tmp / name).write_text(text)
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def save(job, root: str | Path, loop_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it at the same step."""
    root = Path(root)
    final = root / f"{PREFIX}{loop_state['step']:09d}"
    estimator = job.streaming_frequency
    state = {**loop_state, "rng": rng_state(), "frequency_step": estimator.step if estimator else 0}
    write_atomically(stateful(job), final, {STATE_FILE: json.dumps(state), CONFIG_FILE: dump(job.cfg)})
    if dist.get_rank() == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def save_model(job, path: Path, info: dict) -> None:
    """Collective. Model weights only (no optimizer state), with the config that built the model:
    what export reads."""
    write_atomically({"model": job.dmp.state_dict()}, path, {STATE_FILE: json.dumps(info), CONFIG_FILE: dump(job.cfg)})


def load(job, path: Path) -> dict:
    """Restores model and optimizers in place; returns the loop state saved with them."""
    job.dense_optimizer.init_state()  # Adam creates its state lazily; DCP needs tensors to load into
    items = stateful(job)
    dcp.load(items, checkpoint_id=str(path))
    job.dmp.load_state_dict(items["model"])
    job.dmp.fused_optimizer.load_state_dict(items["fused_optimizer"])
    job.dense_optimizer.load_state_dict(items["dense_optimizer"])
    state = read_state(path)
    if job.streaming_frequency is not None:
        job.streaming_frequency.step = state["frequency_step"]
    restore_rng(state["rng"])
    return state
