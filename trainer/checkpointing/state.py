"""The training loop's state: where it is, and what model selection has seen. Typed, so a checkpoint
saves and restores exactly these fields (`checkpoint.py` writes them as JSON beside the tensors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Fields that checkpoints of older versions lack, whose defaults are what those versions did.
ADDED_LATER = {"lr_scale"}


@dataclass
class LoopState:
    epoch: int = 0  # the epoch in progress
    batch: int = 0  # the next batch of that epoch
    step: int = 0  # optimizer steps so far
    best_value: float = -1.0  # the early-stopping metric of the best epoch (metrics are >= 0)
    best_epoch: int = -1
    best_step: int = -1
    epochs_without_improvement: int = 0
    stopped: bool = False  # early stopping or train.max_steps ended training
    history: list[dict] = field(default_factory=list)  # validation metrics of every epoch
    run_id: str | None = None  # the MLflow run every restart continues
    lr_scale: float = 1.0  # both learning rates are the configured ones times this (optim.plateau_decay)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoopState":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(known - set(data) - ADDED_LATER)
        if missing:
            raise ValueError(f"the loop state lacks {missing}: written by an older version of the trainer")
        return cls(**{k: v for k, v in data.items() if k in known})

    def select(self, epoch: int, value: float, patience: int) -> bool:
        """Model selection after an epoch's validation: True when it is the best so far. Early stopping
        ends training after `patience` epochs in a row without improvement (Keras' and Lightning's rule)."""
        if value > self.best_value:
            self.best_value, self.best_epoch, self.best_step = value, epoch, self.step
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        self.stopped |= self.epochs_without_improvement >= patience
        return False
