"""Sampled softmax over in-batch positives plus mixed negatives, with logQ correction.

For query row i the candidates are the G in-batch positives (of the global batch) followed by S
negatives sampled from the corpus. The logit of candidate j is <q_i, v_j> / T - log Q(j), where
Q(j) = G p(j) + S q(j) is the expected number of times item j is among the candidates: p is the
unigram frequency of positives (exact counts or the streaming estimate of Yi et al. 2019) and q is
the negative proposal. Columns holding the row's own item (accidental hits) and padding columns
are masked with `where` and a large finite negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.collectives import all_gather_ids, all_gather_with_grad

MASKED_LOGIT = -1e9


def sampled_softmax_loss(query: torch.Tensor, candidates: torch.Tensor, candidate_ids: torch.Tensor,
                         positive_index: torch.Tensor, row_mask: torch.Tensor, log_q: torch.Tensor | None,
                         num_in_batch: int, temperature: float, in_batch: bool = True,
                         logq_on_positive: bool = True, normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Loss summed over the rows of `row_mask`, divided by `normalizer` (default: their number, the mean).

    query (B, d); candidates (C, d) with C = num_in_batch + S; candidate_ids (C,); positive_index (B,):
    the column of each row's positive; log_q (C,): log Q of each column's item, or None for no logQ.
    """
    logits = query @ candidates.T / temperature
    columns = torch.arange(candidates.shape[0], device=query.device)
    own = columns[None, :] == positive_index[:, None]
    if log_q is not None:
        correction = log_q[None, :].expand_as(logits)
        if not logq_on_positive:
            correction = torch.where(own, torch.zeros_like(correction), correction)
        logits = logits - correction
    positive_ids = candidate_ids[positive_index]
    masked = (candidate_ids[None, :] == positive_ids[:, None]) | (candidate_ids == 0)[None, :]
    if not in_batch:
        masked = masked | (columns < num_in_batch)[None, :]
    logits = torch.where(masked & ~own, torch.full_like(logits, MASKED_LOGIT), logits)
    per_row = F.cross_entropy(logits, positive_index, reduction="none")
    weights = row_mask.to(per_row.dtype)
    if normalizer is None:
        normalizer = weights.sum()
    return (per_row * weights).sum() / normalizer.to(per_row.dtype).clamp(min=1e-6)  # 0 rows: 0 / tiny = 0


class StreamingFrequency:
    """Yi et al. 2019: per hashed item, the last step it was seen (A) and an EMA of the gap (B).

    1 / B estimates how many times the item appears per step. Every rank feeds it the same global
    ids, so the state stays identical across ranks without communication.
    """

    def __init__(self, buckets: int, alpha: float, device: torch.device):
        self.buckets, self.alpha = buckets, alpha
        self.last_step = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.gap = torch.zeros(buckets, dtype=torch.float64, device=device)
        self.step = 0

    def _hash(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids * 2654435761) % self.buckets

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        self.step += 1
        slots, counts = torch.unique(self._hash(ids[ids > 0]), return_counts=True)
        seen = self.last_step[slots] > 0
        elapsed = self.step - self.last_step[slots]
        gap = torch.where(seen, (1 - self.alpha) * self.gap[slots] + self.alpha * elapsed, elapsed)
        # Further occurrences within the same step have elapsed time 0: the EMA shrinks once per extra copy.
        self.gap[slots] = gap * (1 - self.alpha) ** (counts - 1).to(gap.dtype)
        self.last_step[slots] = float(self.step)

    def per_step_count(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated occurrences of each id per step (0 for ids never seen)."""
        gap = self.gap[self._hash(ids)]
        return torch.where(gap > 0, 1.0 / gap.clamp(min=1e-12), torch.zeros_like(gap))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so torch.distributed.checkpoint saves and loads it like the model."""
        return {"last_step": self.last_step, "gap": self.gap, "step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict) -> None:
        self.last_step.copy_(state["last_step"])
        self.gap.copy_(state["gap"])
        self.step = int(state["step"])


class CandidateLogQ:
    """log Q(j) = log(G p(j) + S q(j)) for candidate ids, from exact counts or the streaming estimate."""

    def __init__(self, freq: torch.Tensor, proposal: torch.Tensor, num_negatives: int, in_batch: bool,
                 frequency: str, buckets: int, alpha: float):
        self.unigram = freq.double() / freq.sum().clamp(min=1)
        self.proposal = proposal.double()
        self.num_negatives = num_negatives
        self.in_batch = in_batch
        self.streaming = StreamingFrequency(buckets, alpha, freq.device) if frequency == "streaming" else None

    def __call__(self, candidate_ids: torch.Tensor, global_positives: torch.Tensor) -> torch.Tensor:
        """`global_positives` are the ids of the global batch's positives; 0 marks a padding row, which
        draws no in-batch candidate: G counts the real positives only."""
        if self.streaming is not None:
            self.streaming.update(global_positives)
            in_batch = self.streaming.per_step_count(candidate_ids)
        else:
            in_batch = (global_positives > 0).sum() * self.unigram[candidate_ids]
        expected = self.num_negatives * self.proposal[candidate_ids]
        if self.in_batch:
            expected = expected + in_batch
        return torch.log(expected.clamp(min=1e-12)).float()


class RetrievalLoss(torch.nn.Module):
    """Glue between a TrainBatch and `sampled_softmax_loss`. Being a module without sharded
    children, it is a leaf for the pipeline's FX tracer, so its data-dependent code is not traced."""

    def __init__(self, temperature: float, in_batch: bool, logq_on_positive: bool, log_q: CandidateLogQ | None,
                 world_size: int = 1):
        super().__init__()
        self.world_size = world_size
        self.temperature = temperature
        self.in_batch = in_batch
        self.logq_on_positive = logq_on_positive
        self.log_q = log_q

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
                                    normalizer=normalizer)
