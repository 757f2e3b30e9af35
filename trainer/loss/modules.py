"""The losses the model calls: a TrainBatch's or a SequenceBatch's candidates, gathered across ranks, into the
kernel (trainer/loss/kernel.py); `build_loss` makes the one the job's tower and negatives need."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from config import JobConfig
from data.keys import SEQUENCE_KEY
from data.negatives import Negatives
from serving.plain import first_copies
from trainer.collectives import all_gather_ids, all_gather_with_grad
from trainer.loss.kernel import (
    DEFAULT_MAX_LOGITS,
    accidental_hits,
    column_bias,
    merge_duplicates,
    no_hits,
    sampled_softmax_loss,
    seen_hits,
    softmax_cross_entropy,
    union_hits,
)
from trainer.loss.logq import CandidateLogQ
from trainer.precision import matmul_dtype


class RetrievalLoss(torch.nn.Module):
    """Glue between a TrainBatch and `sampled_softmax_loss`. Being a module without sharded
    children, it is a leaf for the pipeline's FX tracer, so its data-dependent code is not traced."""

    def __init__(self, temperature: float, in_batch: bool, logq_on_positive: bool, log_q: CandidateLogQ | None,
                 max_logits: int = DEFAULT_MAX_LOGITS, world_size: int = 1, merge: bool = True,
                 matmul_dtype: torch.dtype | None = None):
        super().__init__()
        self.temperature, self.in_batch, self.logq_on_positive = temperature, in_batch, logq_on_positive
        self.log_q, self.max_logits, self.world_size, self.merge = log_q, max_logits, world_size, merge
        self.matmul_dtype = matmul_dtype

    def forward(self, query: torch.Tensor, candidates: torch.Tensor, batch) -> torch.Tensor:
        """In-batch positives are gathered from every rank, so the negatives are the global batch.

        Gradients are averaged over ranks (DDP for the MLPs, TorchRec's gradient division for the
        tables), so each rank divides its summed loss by the global number of real rows over the world
        size: the average is then the mean over the global batch's real rows, even when an epoch's
        padded last batch leaves the ranks with different numbers of real rows."""
        b = query.shape[0]
        positives, positive_ids = candidates[:b], batch.candidate_ids[:b]
        offset = 0
        if self.world_size > 1:
            positives, positive_ids = all_gather_with_grad(positives), all_gather_ids(positive_ids)
            offset = torch.distributed.get_rank() * b
        candidates = torch.cat([positives, candidates[b:]])
        ids = torch.cat([positive_ids, batch.candidate_ids[b:]])
        log_q = self.log_q(ids, positive_ids) if self.log_q is not None else None
        positive_index = offset + torch.arange(b, device=query.device)
        normalizer = (positive_ids > 0).sum() / self.world_size
        return sampled_softmax_loss(query, candidates, ids, positive_index, batch.row_mask, log_q,
                                    num_in_batch=len(positive_ids), temperature=self.temperature,
                                    in_batch=self.in_batch, logq_on_positive=self.logq_on_positive,
                                    normalizer=normalizer, max_logits=self.max_logits, merge=self.merge,
                                    matmul_dtype=self.matmul_dtype)


def padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class SequenceRetrievalLoss(torch.nn.Module):
    """The transformer's loss: every real position against the global batch's distinct targets plus the rank's
    mixed negatives. Across ranks the distinct targets are one set: every rank's set is gathered (padded to
    the largest with id 0) and each item kept once, at its first copy, so a world of W ranks builds the same
    candidates as one process on the concatenated batch. A position's own column is its target's; any other
    column holding that item (a mixed negative) is an accidental hit and is masked; with `mask_seen`, so is
    every column holding an item the position has already read. The loss is the sum over positions divided by
    the global number of positions over the world size, as in `RetrievalLoss`."""

    def __init__(self, temperature: float, in_batch: bool, logq_on_positive: bool, log_q: CandidateLogQ | None,
                 max_logits: int = DEFAULT_MAX_LOGITS, world_size: int = 1, merge: bool = True,
                 matmul_dtype: torch.dtype | None = None, mask_seen: bool = False):
        super().__init__()
        self.temperature, self.in_batch, self.logq_on_positive = temperature, in_batch, logq_on_positive
        self.log_q, self.max_logits, self.world_size, self.merge = log_q, max_logits, world_size, merge
        self.matmul_dtype, self.mask_seen = matmul_dtype, mask_seen

    def forward(self, query: torch.Tensor, candidates: torch.Tensor, batch) -> torch.Tensor:
        u = int(batch.num_positives[0])
        positives, positive_ids = candidates[:u], batch.candidate_ids[:u]
        own = batch.own_column
        targets = positive_ids[own]
        all_targets, positions = targets, torch.tensor([own.numel()], device=query.device)
        if self.world_size > 1:
            width = torch.tensor([u, own.numel()], device=query.device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            dist.all_reduce(positions)
            all_targets = all_gather_ids(padded_rows(targets, int(width[1])))
            positives, positive_ids = global_distinct(all_gather_with_grad(padded_rows(positives, int(width[0]))),
                                                      all_gather_ids(padded_rows(positive_ids, int(width[0]))))
            own = torch.searchsorted(positive_ids, targets)
        ids = torch.cat([positive_ids, batch.candidate_ids[u:]])
        log_q = self.log_q.distinct(ids, all_targets, positions) if self.log_q is not None else None
        bias = column_bias(ids, log_q, len(positive_ids), self.in_batch)
        own_bias = -log_q[own] if log_q is not None and self.logq_on_positive else torch.zeros_like(query[:, 0])
        columns = torch.cat([positives, candidates[u:]])
        if self.merge:
            columns, bias, own, column_ids = merge_duplicates(columns, ids, bias, own)
            hits = no_hits(own)
        else:
            hits, column_ids = accidental_hits(targets, ids, own), ids
        if self.mask_seen:
            history = batch.sequence[SEQUENCE_KEY]
            seen = seen_hits(history.values(), history.lengths()[:batch.row_mask.shape[0]], batch.positions,
                             column_ids, own)
            hits = union_hits(hits, seen)
        total = softmax_cross_entropy(query, columns, bias, own, own_bias, hits, torch.ones_like(query[:, 0]),
                                      self.temperature, self.max_logits, self.matmul_dtype)
        return total / (positions.sum() / self.world_size).clamp(min=1e-6)


def global_distinct(embeddings: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the gathered per-rank distinct targets, each real item once (its first copy, so its gradient
    flows back to one rank) in ascending id order, as `np.unique` orders a single process's set."""
    distinct, first, _ = first_copies(ids)
    real = distinct > 0
    return embeddings[first[real]], distinct[real]


def build_loss(cfg: JobConfig, negatives: Negatives, freq: np.ndarray, sequence: bool,
               device: torch.device | None = None, world_size: int = 1,
               merge: bool | None = None, precision: str | None = None) -> RetrievalLoss | SequenceRetrievalLoss:
    """The job's loss, built the one way the trainer and the benches share: the tower's batch layout picks the
    module (a query per position of sequence batches, one per row otherwise), `negatives` which columns are
    negatives and the sampled part of logQ, `freq` (training counts) the in-batch part. `merge` overrides
    loss.merge_duplicates (the benches time both), `precision` train.precision (the benches' plain baselines run
    fp32)."""
    log_q = None
    if cfg.loss.logq:
        log_q = CandidateLogQ(torch.from_numpy(freq).to(device or torch.device("cpu")), negatives, cfg.loss.frequency,
                              cfg.loss.streaming_buckets, cfg.loss.streaming_alpha)
    merge = cfg.loss.merge_duplicates if merge is None else merge
    common = (cfg.loss.temperature, negatives.in_batch, cfg.loss.logq_on_positive, log_q, cfg.loss.max_logits,
              world_size, merge, matmul_dtype(precision or cfg.train.precision))
    return SequenceRetrievalLoss(*common, mask_seen=cfg.loss.mask_seen) if sequence else RetrievalLoss(*common)
