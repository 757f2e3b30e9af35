"""Batches the model reads, as TorchRec `Pipelineable`s so TrainPipelineSparseDist can overlap them.

One KeyedJaggedTensor carries both towers' sparse features. For training its stride is B + S: rows
[0, B) are the queries with their positives, rows [B, B + S) are the S sampled negatives, whose query
keys are empty bags. That way one EmbeddingBagCollection call serves both towers (and a shared item
table), which is what lets the pipeline prefetch the whole lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from data.keys import Jagged


def make_kjt(keys: list[str], arrays: list[Jagged]) -> KeyedJaggedTensor:
    """One KJT from (lengths, values) per key, in key order. No keys (a sequence file without features) gives an
    empty KJT, which the towers never read."""
    if not keys:
        return KeyedJaggedTensor.empty()
    lengths = np.concatenate([a[0] for a in arrays], dtype=np.int32)
    values = np.concatenate([a[1] for a in arrays], dtype=np.int64)
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))


def no_times() -> torch.Tensor:
    """The `times` of a sequence batch whose data has no event times. Where it has them, `times` is (B, width + 1)
    int64 seconds, width the longest row: row i's inputs' times, then the time of the event its last input
    predicts (the target's in training, the query's in evaluation), left-aligned, zeros after."""
    return torch.zeros(0, dtype=torch.long)


def no_lanes() -> torch.Tensor:
    """The `lanes` of a sequence batch whose rows are padded, each to the longest (one row a lane). Packed
    (`loader.pack_rows`), `lanes` is (B, 2) int64: each row's lane and first column (data.ragged.pack_lanes)."""
    return torch.zeros(0, 2, dtype=torch.long)


class TensorFields(Pipelineable):
    """Moves every tensor/KJT field together; the dataclasses below only declare fields."""

    def _map(self, fn) -> "TensorFields":
        return type(self)(**{f.name: fn(getattr(self, f.name)) for f in fields(self)})  # type: ignore[arg-type]

    def to(self, device: torch.device, non_blocking: bool = False) -> "TensorFields":
        return self._map(lambda t: t.to(device=device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> "TensorFields":
        return self._map(lambda t: t.pin_memory())


@dataclass
class TrainBatch(TensorFields):
    sparse: KeyedJaggedTensor  # stride B + S, see the module docstring
    candidate_ids: torch.Tensor  # (B + S,) positives then sampled negatives; 0 on padding rows
    row_mask: torch.Tensor  # (B,) False on padding rows (the last batch of an epoch)

    @property
    def batch_size(self) -> int:
        return self.row_mask.numel()

    @property
    def num_examples(self) -> int:
        """Trained targets: the real rows."""
        return int(self.row_mask.sum())


@dataclass
class EvalBatch(TensorFields):
    sparse: KeyedJaggedTensor  # stride B; candidate keys present but empty, so the same EBC applies
    users: torch.Tensor
    row_mask: torch.Tensor
    target_offsets: torch.Tensor  # CSR over rows: relevant items
    target_values: torch.Tensor
    seen_offsets: torch.Tensor  # CSR over rows: items to filter from the ranking
    seen_values: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.row_mask.numel()


@dataclass
class SequenceBatch(TensorFields):
    """Training batch of the transformer tower: B sequence rows, P real positions (a position is real when its
    next item is a training target), C candidates (the batch's distinct targets, then the sampled negatives).

    `sequence` (the EmbeddingCollection's input, stride B + C) holds each row's items under SEQUENCE_KEY and
    the candidates under ITEM_KEY; `sparse` (the EBC's, stride P + C) holds each position's query features
    (user features repeated, context of the target event) and the candidates' item features."""

    sparse: KeyedJaggedTensor
    sequence: KeyedJaggedTensor
    positions: torch.Tensor  # (P,) row * max_length + position, max_length = the longest row of the batch
    own_column: torch.Tensor  # (P,) the candidate column of each position's target
    candidate_ids: torch.Tensor  # (C,) distinct targets, then negatives
    num_positives: torch.Tensor  # (1,) how many of the candidates are the distinct targets
    row_mask: torch.Tensor  # (B,) False on padding rows
    times: torch.Tensor = field(default_factory=no_times)  # see `no_times`
    lanes: torch.Tensor = field(default_factory=no_lanes)  # see `no_lanes`

    @property
    def batch_size(self) -> int:
        return self.row_mask.numel()

    @property
    def num_examples(self) -> int:
        """Trained targets: every position."""
        return self.positions.numel()

    def stack_positions(self) -> tuple[int, int]:
        """(computed, real): the positions the causal stack runs on (lanes x the longest row: a lane per row when
        padded, fewer when packed) and the items among them; the rest is padding."""
        lengths = self.sequence.lengths()[:self.row_mask.numel()]
        width = int(lengths.max()) if lengths.numel() else 0
        lanes = int(self.lanes[:, 0].max()) + 1 if self.lanes.numel() and width else lengths.numel()
        return lanes * width, int(lengths.sum())


@dataclass
class SequenceEvalBatch(EvalBatch):
    """An EvalBatch for the transformer tower: `sparse` holds the query features only, `sequence` each row's
    last items; the query is the encoding at each row's last position (`positions`)."""

    sequence: KeyedJaggedTensor
    positions: torch.Tensor
    times: torch.Tensor = field(default_factory=no_times)
