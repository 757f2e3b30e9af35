"""Full-corpus top-K evaluation: every query is scored against the whole catalogue.

Seen items and the pad id are removed from the ranking; each relevant item's rank is the number of
catalogue items scoring strictly higher, plus one. Sums are all-reduced across ranks, and the
popularity baseline goes through the very same function (only the scorer differs).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from data.batch import EvalBatch
from data.loader import Catalogue, make_kjt

Scorer = Callable[[EvalBatch], torch.Tensor]  # (B, num_items + 1) scores; column 0 is the pad id


def ranking_sums(scores: torch.Tensor, batch: EvalBatch, ks: list[int]) -> tuple[dict[str, float], torch.Tensor]:
    """Metric sums over the batch's real rows, and which items made anyone's top max(ks)."""
    scores = scores.float().clone()
    rows = batch.row_mask.nonzero().squeeze(1)
    scores[:, 0] = -torch.inf
    seen_rows = torch.repeat_interleave(torch.arange(len(batch.row_mask)), batch.seen_offsets.diff())
    scores[seen_rows, batch.seen_values] = -torch.inf
    target_counts = batch.target_offsets.diff()
    target_rows = torch.repeat_interleave(torch.arange(len(batch.row_mask)), target_counts)
    target_scores = scores[target_rows, batch.target_values]
    # rank = 1 + #items scoring strictly higher; a target that was filtered as seen can never be found.
    higher = (scores[target_rows] > target_scores[:, None]).sum(1)
    ranks = torch.where(torch.isfinite(target_scores), higher + 1, torch.full_like(higher, 1 << 40)).double()
    sums: dict[str, float] = {"users": float(len(rows))}
    valid = batch.row_mask[target_rows]
    n_targets = target_counts.double().clamp(min=1)
    first_rank = torch.full((len(batch.row_mask),), float(1 << 40), dtype=torch.float64)
    first_rank = first_rank.scatter_reduce(0, target_rows, ranks, reduce="amin")
    sums["mrr"] = float((1.0 / first_rank)[batch.row_mask].sum())
    gains = 1.0 / torch.log2(ranks + 1)
    discounts = torch.cumsum(1.0 / torch.log2(torch.arange(max(ks), dtype=torch.float64) + 2), 0)
    for k in ks:
        hit = (ranks <= k) & valid
        per_row_hits = torch.zeros(len(batch.row_mask), dtype=torch.float64).index_add_(0, target_rows, hit.double())
        dcg = torch.zeros(len(batch.row_mask), dtype=torch.float64).index_add_(0, target_rows,
                                                                                 torch.where(hit, gains, 0.0))
        ideal = discounts[(target_counts.clamp(min=1, max=k) - 1)]
        sums[f"hr@{k}"] = float((per_row_hits > 0)[batch.row_mask].sum())
        sums[f"recall@{k}"] = float((per_row_hits / n_targets)[batch.row_mask].sum())
        sums[f"ndcg@{k}"] = float((dcg / ideal.clamp(min=1e-12))[batch.row_mask].sum())
    top = torch.topk(scores[rows], k=min(max(ks), scores.shape[1] - 1), dim=1).indices
    return sums, top


def evaluate(scorer: Scorer, batches: Iterable[EvalBatch], ks: list[int], num_items: int,
             device: torch.device) -> dict[str, float]:
    """HR@K, Recall@K, NDCG@K, MRR and Coverage@K over every rank's users."""
    totals: dict[str, float] = {}
    covered = {k: torch.zeros(num_items + 1, dtype=torch.int32) for k in ks}
    with torch.no_grad():
        for batch in batches:
            sums, top = ranking_sums(scorer(batch).cpu(), batch, ks)
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
            for k in ks:
                covered[k][top[:, :k].reshape(-1)] = 1
    names = sorted(totals)
    packed = torch.tensor([totals[n] for n in names], dtype=torch.float64, device=device)
    coverage = torch.stack([covered[k] for k in ks]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
        dist.all_reduce(coverage, op=dist.ReduceOp.MAX)
    totals = dict(zip(names, packed.tolist()))
    users = max(totals.pop("users"), 1.0)
    metrics = {name: value / users for name, value in totals.items()}
    for i, k in enumerate(ks):
        metrics[f"coverage@{k}"] = float(coverage[i, 1:].sum()) / num_items
    metrics["users"] = users
    return metrics


def popularity_scorer(freq: np.ndarray) -> Scorer:
    """Training frequency, ties broken towards the lower id so ranks are well defined."""
    ids = np.arange(len(freq), dtype=np.float64)
    scores = torch.from_numpy(freq.astype(np.float64) - ids / (len(freq) + 1.0)).float()
    return lambda batch: scores.expand(len(batch.row_mask), -1)


def item_kjt_chunks(catalogue: Catalogue, query_keys: list[str], candidate_keys: list[str], num_items: int,
                    chunk: int):
    """KJTs over all item ids in chunks, query keys empty: input for the candidate tower."""
    for lo in range(0, num_items + 1, chunk):
        ids = np.arange(lo, min(lo + chunk, num_items + 1), dtype=np.int64)
        empty = (np.zeros(len(ids), dtype=np.int64), np.zeros(0, dtype=np.int64))
        arrays = [empty] * len(query_keys) + catalogue.candidate_arrays(ids)
        yield make_kjt(query_keys + candidate_keys, arrays)
