"""The model the pipeline trains: the job's towers (towers/, chosen by model.query_tower) plus the loss."""

from __future__ import annotations

import torch
from torch import nn

from data.batch import SequenceBatch, TrainBatch


class RetrievalModel(nn.Module):
    """Towers plus loss: forward(batch) -> (loss, stats), the contract TrainPipelineSparseDist expects."""

    def __init__(self, towers: nn.Module, loss_fn):
        super().__init__()
        self.towers = towers
        self.loss_fn = loss_fn

    def forward(self, batch: TrainBatch | SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, candidates = self.towers.encode(batch)
        loss = self.loss_fn(query, candidates, batch)
        return loss, {"loss": loss.detach(), "examples": query.new_tensor(batch.num_examples)}
