"""The job's checkpoints under checkpoint.dir: saved every epoch (and every N steps), the newest `keep_last`
kept, checked against the config and the data before a resume, and restored."""

from __future__ import annotations

import torch.distributed as dist

from config import CheckpointConfig, ConfigError, JobConfig, load_config_text
from storage import Location, location
from storage import commit as storage_commit
from trainer.checkpointing.checkpoint import (
    CONFIG_FILE,
    PREFIX,
    Stateful,
    complete_checkpoints,
    read,
    read_state,
    restore_rng,
    rng_state,
    write,
)
from trainer.checkpointing.compatibility import compatibility
from trainer.checkpointing.state import LoopState


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
        saved = load_config_text((path / CONFIG_FILE).read_text(), str(path / CONFIG_FILE), saved=True)
        loop = LoopState.from_dict(state["loop"])
        return compatibility(saved, cfg, state["world_size"], self.world_size, loop.batch == 0, path)

    def load(self, components: dict[str, Stateful], path: Location) -> LoopState:
        """Restores the components in place and the RNG; returns the loop state saved with them."""
        read(components, path)
        state = read_state(path)
        restore_rng(state["rng"])
        return LoopState.from_dict(state["loop"])
