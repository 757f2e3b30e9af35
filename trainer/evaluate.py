"""Full-corpus top-K evaluation: every query is scored against the whole catalogue.

Protocol (docs/data.md "Evaluation protocol"): the pad id is never ranked; with `filter_seen` (the default)
the items a user consumed before the query are removed from the ranking, and a target among them,
which could then never be found, is not counted: a query left with no rankable target is skipped
and reported as `skipped`, never scored 0. Each relevant item's rank is the number of catalogue
items scoring strictly higher, plus one. Sums are all-reduced across ranks, and the popularity
baseline goes through the very same function (only the scorer differs).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from data.batch import EvalBatch

Scorer = Callable[[EvalBatch], torch.Tensor]  # (B, num_items + 1) scores; column 0 is the pad id
NEVER = float(1 << 40)  # the rank of a target outside every cut-off


class EvaluationError(RuntimeError):
    """The evaluation cannot give a meaningful number (NaN scores, nothing rankable)."""


def ranking_sums(scores: torch.Tensor, batch: EvalBatch, ks: list[int],
                 filter_seen: bool = True) -> tuple[dict[str, float], torch.Tensor]:
    """Metric sums over the batch's evaluated rows, and which items made an evaluated row's top max(ks)
    (-1 where fewer items could be ranked)."""
    scores = scores.clone() if scores.dtype == torch.float64 else scores.float().clone()
    if torch.isnan(scores).any():
        raise EvaluationError("the model produced NaN scores: the weights have diverged (lower the learning rates "
                              "or check the data for extreme values)")
    n = len(batch.row_mask)
    scores[:, 0] = -torch.inf
    if filter_seen:
        seen_rows = torch.repeat_interleave(torch.arange(n), batch.seen_offsets.diff())
        scores[seen_rows, batch.seen_values] = -torch.inf
    target_rows = torch.repeat_interleave(torch.arange(n), batch.target_offsets.diff())
    target_scores = scores[target_rows, batch.target_values]
    # A target that was filtered (seen) can never be ranked: it is no target of this protocol.
    rankable = torch.isfinite(target_scores) & batch.row_mask[target_rows]
    per_row = torch.zeros(n, dtype=torch.float64).index_add_(0, target_rows, rankable.double())
    evaluated = batch.row_mask & (per_row > 0)
    higher = (scores[target_rows] > target_scores[:, None]).sum(1)
    ranks = torch.where(rankable, higher + 1, torch.full_like(higher, int(NEVER))).double()
    sums: dict[str, float] = {"users": float(evaluated.sum()), "skipped": float((batch.row_mask & ~evaluated).sum())}
    first_rank = torch.full((n,), NEVER, dtype=torch.float64).scatter_reduce(0, target_rows, ranks, reduce="amin")
    sums["mrr"] = float((1.0 / first_rank)[evaluated].sum())
    gains = 1.0 / torch.log2(ranks + 1)
    discounts = torch.cumsum(1.0 / torch.log2(torch.arange(max(ks), dtype=torch.float64) + 2), 0)
    for k in ks:
        hit = (ranks <= k) & rankable
        hits = torch.zeros(n, dtype=torch.float64).index_add_(0, target_rows, hit.double())
        dcg = torch.zeros(n, dtype=torch.float64).index_add_(0, target_rows, torch.where(hit, gains, 0.0))
        ideal = discounts[per_row.clamp(min=1, max=k).long() - 1]
        sums[f"hr@{k}"] = float((hits > 0)[evaluated].sum())
        sums[f"recall@{k}"] = float((hits / per_row.clamp(min=1))[evaluated].sum())
        sums[f"ndcg@{k}"] = float((dcg / ideal)[evaluated].sum())
    rows = evaluated.nonzero().squeeze(1)
    top_scores, top = torch.topk(scores[rows], k=min(max(ks), scores.shape[1]), dim=1)
    return sums, torch.where(torch.isfinite(top_scores), top, -1)


def evaluate(scorer: Scorer, batches: Iterable[EvalBatch], ks: list[int], num_items: int,
             device: torch.device, filter_seen: bool = True) -> dict[str, float]:
    """HR@K, Recall@K, NDCG@K, MRR and Coverage@K over every rank's evaluated queries; `users` is
    how many were evaluated and `skipped` how many had no rankable target."""
    totals: dict[str, float] = {}
    covered = {k: torch.zeros(num_items + 2, dtype=torch.int32) for k in ks}  # the last slot collects -1
    with torch.no_grad():
        for batch in batches:
            sums, top = ranking_sums(scorer(batch).cpu(), batch, ks, filter_seen)
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
            for k in ks:
                covered[k][top[:, :k].reshape(-1)] = 1
    names = sorted(totals)
    packed = torch.tensor([totals.get(n, 0.0) for n in names], dtype=torch.float64, device=device)
    coverage = torch.stack([covered[k][:-1] for k in ks]).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed)
        dist.all_reduce(coverage, op=dist.ReduceOp.MAX)
    totals = dict(zip(names, packed.tolist()))
    users, skipped = totals.pop("users", 0.0), totals.pop("skipped", 0.0)
    if users == 0:
        raise EvaluationError(f"no query has a target that can be ranked ({int(skipped)} skipped: every target was "
                              f"already consumed by its user and is filtered as seen); set eval.filter_seen=false "
                              f"for data where repeats are the point")
    metrics = {name: value / users for name, value in totals.items()}
    for i, k in enumerate(ks):
        metrics[f"coverage@{k}"] = float(coverage[i, 1:].sum()) / num_items
    metrics["users"] = users
    metrics["skipped"] = skipped
    return metrics


def popularity_scorer(freq: np.ndarray) -> Scorer:
    """Training frequency, ties broken towards the lower id. The score is the item's position in that
    order (N for the most popular), exact in float64 however large the counts."""
    order = np.lexsort((np.arange(len(freq)), -freq.astype(np.int64)))
    scores = np.empty(len(freq), dtype=np.float64)
    scores[order] = np.arange(len(freq), 0, -1, dtype=np.float64)
    table = torch.from_numpy(scores)
    return lambda batch: table.expand(len(batch.row_mask), -1)
