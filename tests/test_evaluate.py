"""Full-corpus metrics on an example small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from data.batch import EvalBatch
from trainer.evaluate import evaluate, popularity_scorer


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


def test_metrics_by_hand():
    # Catalogue of 6 items (ids 1..6). Scores per user over ids 0..6 (0 is padding).
    scores = torch.tensor([
        [9.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # user A: target 3, seen {1}: ranking 2,3,4,5,6 -> rank 2
        [9.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # user B: targets {1, 5}, seen {6}: ranking 5,4,3,2,1 -> ranks 1, 5
        [9.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # user C: target 2 but it was seen -> never found
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # padding row: ignored
    ])
    batch = eval_batch(targets=[[3], [1, 5], [2], []], seen=[[1], [6], [2], []])
    m = evaluate(lambda b: scores, [batch], ks=[1, 2], num_items=6, device=torch.device("cpu"))
    assert m["users"] == 3
    assert m["hr@1"] == pytest.approx(1 / 3)  # only B has a relevant item at rank 1
    assert m["hr@2"] == pytest.approx(2 / 3)  # A (rank 2) and B
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    ndcg_a = (1 / math.log2(3)) / 1.0
    ndcg_b = 1.0 / (1 + 1 / math.log2(3))  # hit at rank 1 only, ideal has two hits
    assert m["ndcg@2"] == pytest.approx((ndcg_a + ndcg_b + 0) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 1 + 0) / 3)
    # top-2 lists: A {2, 3}, B {5, 4}, C {1, 3}: 5 distinct of 6 items.
    assert m["coverage@2"] == pytest.approx(5 / 6)
    assert m["coverage@1"] == pytest.approx(3 / 6)  # {2, 5, 1}


def test_popularity_baseline_goes_through_the_same_evaluator():
    freq = np.array([0, 5, 9, 9, 1, 0, 2])  # items 2 and 3 tie: the lower id ranks first
    batch = eval_batch(targets=[[3], [4]], seen=[[], [2, 3]])
    m = evaluate(popularity_scorer(freq), [batch], ks=[1, 3], num_items=6, device=torch.device("cpu"))
    # user 1: ranking 2, 3, 1, ... -> target 3 at rank 2; user 2: ranking 1, 6, 4 -> target 4 at rank 3
    assert m["hr@1"] == 0.0 and m["hr@3"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 2)
