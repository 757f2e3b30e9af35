"""The selected epoch's weights (`BestWeights`): kept at each improvement, restored for the test, read by
export."""

from __future__ import annotations

import tempfile

import torch
import torch.distributed as dist

from storage import Location, committed, location
from storage import commit as storage_commit
from trainer.checkpointing.checkpoint import (
    BEST_MODEL,
    CheckpointError,
    Stateful,
    read,
    save_model,
    verify,
)


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
