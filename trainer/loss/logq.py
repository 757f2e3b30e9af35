"""log Q(j), the expected number of times item j is among a batch's candidates: from exact training
counts or the streaming estimate of Yi et al. 2019, plus the sampled negatives' S q(j) (data/negatives.py)."""

from __future__ import annotations

import torch

from data.negatives import Negatives


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
    """log Q(j) = log(G p(j) + S q(j)) for candidate ids, from exact counts or the streaming estimate; the G p(j)
    term only when the negatives include the in-batch positives."""

    def __init__(self, freq: torch.Tensor, negatives: Negatives, frequency: str, buckets: int, alpha: float):
        self.unigram = freq.double() / freq.sum().clamp(min=1)
        self.sampled = torch.from_numpy(negatives.expected_sampled()).to(freq.device)
        self.in_batch = negatives.in_batch
        self.streaming = StreamingFrequency(buckets, alpha, freq.device) if frequency == "streaming" else None

    def __call__(self, candidate_ids: torch.Tensor, global_positives: torch.Tensor) -> torch.Tensor:
        """`global_positives` are the ids of the global batch's positives; 0 marks a padding row, which
        draws no in-batch candidate: G counts the real positives only."""
        if self.streaming is not None:
            self.streaming.update(global_positives)
            in_batch = self.streaming.per_step_count(candidate_ids)
        else:
            in_batch = (global_positives > 0).sum() * self.unigram[candidate_ids]
        expected = self.sampled[candidate_ids]
        if self.in_batch:
            expected = expected + in_batch
        return torch.log(expected.clamp(min=1e-12)).float()


    def distinct(self, candidate_ids: torch.Tensor, positives: torch.Tensor, set_sizes: torch.Tensor) -> torch.Tensor:
        """log Q for the transformer's candidates: the *distinct* targets of the global batch's P positions hold
        item j with probability 1 - (1 - p(j))^P (streaming: 1 - exp(-estimated count per step)), plus S q(j)
        for the mixed negatives. `positives` are the global batch's position targets (0: padding), `set_sizes`
        the sizes of the sets that were made distinct (one: P), each contributing its term."""
        sizes = set_sizes.double()[:, None]
        if self.streaming is not None:
            self.streaming.update(positives)
            rate = self.streaming.per_step_count(candidate_ids)[None, :] * sizes / sizes.sum().clamp(min=1)
            in_batch = -torch.expm1(-rate).sum(0)
        else:
            in_batch = -torch.expm1(sizes * torch.log1p(-self.unigram[candidate_ids].clamp(max=1.0))[None, :]).sum(0)
        expected = self.sampled[candidate_ids]
        if self.in_batch:
            expected = expected + in_batch
        return torch.log(expected.clamp(min=1e-12)).float()
