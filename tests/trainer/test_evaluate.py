"""Full-corpus metrics on examples small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from data.batch import EvalBatch
from trainer.evaluate import EvaluationError, evaluate, popularity_scorer

CPU = torch.device("cpu")


def eval_batch(targets, seen):
    def csr(rows):
        offsets = torch.tensor([0] + list(np.cumsum([len(r) for r in rows])))
        return offsets, torch.tensor([v for r in rows for v in r], dtype=torch.long)

    t_off, t_val = csr(targets)
    s_off, s_val = csr(seen)
    n = len(targets)
    users = torch.tensor([i + 1 if targets[i] else 0 for i in range(n)])
    kjt = KeyedJaggedTensor(keys=["x"], values=torch.zeros(0, dtype=torch.long),
                            lengths=torch.zeros(n, dtype=torch.int))
    return EvalBatch(kjt, users, users > 0, t_off, t_val, s_off, s_val)


# Catalogue of 6 items (ids 1..6). Scores per user over ids 0..6 (0 is padding).
SCORES = torch.tensor([
    [9.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # user A: target 3, seen {1}
    [9.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # user B: targets {1, 5}, seen {6}
    [9.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # user C: target 2, which they had already consumed
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # padding row: ignored
])
BATCH = dict(targets=[[3], [1, 5], [2], []], seen=[[1], [6], [2], []])


def test_metrics_by_hand_with_seen_items_filtered():
    m = evaluate(lambda b: SCORES, [eval_batch(**BATCH)], ks=[1, 2], num_items=6, device=CPU)
    # A: ranking 2,3,4,5,6 -> rank 2. B: ranking 5,4,3,2,1 -> ranks 1 and 5. C: the target is seen, so
    # it can never be ranked: C is skipped, not scored 0.
    assert (m["users"], m["skipped"]) == (2, 1)
    assert m["hr@1"] == pytest.approx(1 / 2)
    assert m["hr@2"] == pytest.approx(2 / 2)
    assert m["recall@2"] == pytest.approx((1 + 0.5) / 2)
    ndcg_a = (1 / math.log2(3)) / 1.0
    ndcg_b = 1.0 / (1 + 1 / math.log2(3))  # hit at rank 1 only, ideal has two hits
    assert m["ndcg@2"] == pytest.approx((ndcg_a + ndcg_b) / 2)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 1) / 2)
    # top-2 lists of the evaluated users: A {2, 3}, B {5, 4}: 4 distinct of 6 items.
    assert m["coverage@2"] == pytest.approx(4 / 6)
    assert m["coverage@1"] == pytest.approx(2 / 6)


def test_metrics_by_hand_without_filtering_seen_items():
    m = evaluate(lambda b: SCORES, [eval_batch(**BATCH)], ks=[1, 2], num_items=6, device=CPU, filter_seen=False)
    # A: ranking 1,2,3 -> target 3 at rank 3. B: ranking 6,5,...,1 -> 5 at rank 2, 1 at rank 6. C: 1,2 -> rank 2.
    assert (m["users"], m["skipped"]) == (3, 0)
    assert m["hr@1"] == 0.0
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)


def test_a_repeat_target_leaves_the_relevant_set_but_the_others_count():
    """Time split: several targets, one of them consumed before: recall is over the new items only."""
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.6]])
    m = evaluate(lambda b: scores, [eval_batch(targets=[[1, 3]], seen=[[1]])], ks=[1], num_items=4, device=CPU)
    # Ranking without item 1: 2, 3, 4. The only rankable target, 3, is at rank 2.
    assert (m["users"], m["skipped"]) == (1, 0)
    assert m["recall@1"] == 0.0 and m["mrr"] == pytest.approx(1 / 2)
    m = evaluate(lambda b: scores, [eval_batch(targets=[[1, 2]], seen=[[1]])], ks=[1], num_items=4, device=CPU)
    assert m["recall@1"] == 1.0 and m["ndcg@1"] == 1.0, "ideal DCG counts the one rankable target, not two"


def test_coverage_counts_only_items_that_could_be_ranked():
    """55 of 60 items seen: the top 50 holds 5 real items and 45 filtered ones, which are not covered."""
    scores = torch.linspace(1, 0, 61)[None, :]
    batch = eval_batch(targets=[[60]], seen=[list(range(1, 56))])
    m = evaluate(lambda b: scores, [batch], ks=[50], num_items=60, device=CPU)
    assert m["coverage@50"] == pytest.approx(5 / 60)


def test_popularity_baseline_goes_through_the_same_evaluator():
    freq = np.array([0, 5, 9, 9, 1, 0, 2])  # items 2 and 3 tie: the lower id ranks first
    batch = eval_batch(targets=[[3], [4]], seen=[[], [2, 3]])
    m = evaluate(popularity_scorer(freq), [batch], ks=[1, 3], num_items=6, device=CPU)
    # user 1: ranking 2, 3, 1, ... -> target 3 at rank 2; user 2: ranking 1, 6, 4 -> target 4 at rank 3
    assert m["hr@1"] == 0.0 and m["hr@3"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_popularity_ties_stay_exact_with_large_counts():
    """freq - id / (N + 1) in float32 made five items with 70,000 events tie (in the target's favour)."""
    n = 30_005
    freq = np.zeros(n + 1, dtype=np.int64)
    freq[n - 4:] = 70_000
    m = evaluate(popularity_scorer(freq), [eval_batch(targets=[[n]], seen=[[]])], ks=[1, 5], num_items=n, device=CPU)
    assert m["hr@1"] == 0.0 and m["hr@5"] == 1.0
    assert m["mrr"] == pytest.approx(1 / 5), "the highest id of five tied items ranks fifth"


def test_nan_scores_fail_instead_of_ranking_first():
    scores = SCORES.clone()
    scores[0, 3] = float("nan")
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate(lambda b: scores, [eval_batch(**BATCH)], ks=[1], num_items=6, device=CPU)


def test_nothing_rankable_is_an_error_not_a_zero():
    batch = eval_batch(targets=[[2], [3]], seen=[[2], [1, 3]])
    with pytest.raises(EvaluationError, match="filter_seen=false"):
        evaluate(lambda b: SCORES[:2], [batch], ks=[1], num_items=6, device=CPU)
