"""The negatives interface (data/negatives.py): each kind's proposal, what it draws, and what logQ reads from it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from config import ConfigError, NegativesConfig, load_config
from data.negatives import Negatives
from trainer.loss.logq import CandidateLogQ

FREQ = np.array([0, 6, 3, 0, 1])  # id 0 is padding; item 3 was never seen in training


@pytest.mark.parametrize("kind,alpha,in_batch,weights", [
    ("in_batch", 0.75, True, [0, 0, 0, 0, 0]),
    ("uniform", 0.75, False, [0, 1, 1, 1, 1]),
    ("frequency", 1.0, False, [0, 6, 3, 0, 1]),
    ("frequency", 0.5, False, [0, 6 ** 0.5, 3 ** 0.5, 0, 1]),
    ("mixed", 0.5, True, [0, 6 ** 0.5, 3 ** 0.5, 0, 1]),
    ("mixed", 0.0, True, [0, 1, 1, 1, 1]),
])
def test_each_kind_has_its_proposal_and_in_batch_flag(kind, alpha, in_batch, weights):
    negatives = Negatives.of(NegativesConfig(kind, 7, alpha), FREQ)
    weights = np.array(weights, dtype=np.float64)
    expected = weights / weights.sum() if weights.sum() else weights
    np.testing.assert_allclose(negatives.probs, expected, rtol=1e-12)
    assert negatives.in_batch == in_batch
    assert negatives.num_sampled == (0 if kind == "in_batch" else 7)
    drawn = negatives.sample(np.random.default_rng(0))
    assert len(drawn) == negatives.num_sampled and np.all(negatives.probs[drawn] > 0), "never pad, never q = 0"


def test_catalogue_negatives_are_every_item_once_with_log_q_zero():
    negatives = Negatives.of(NegativesConfig("catalogue", num_sampled=7), FREQ)
    assert (negatives.in_batch, negatives.num_sampled) == (False, 4), "every item, whatever num_sampled says"
    for seed in (0, 1):
        np.testing.assert_array_equal(negatives.sample(np.random.default_rng(seed)), [1, 2, 3, 4])
    np.testing.assert_allclose(negatives.expected_sampled()[1:], 1.0)
    log_q = CandidateLogQ(torch.tensor(FREQ, dtype=torch.float64), negatives, "exact", 16, 0.1)
    np.testing.assert_allclose(log_q(torch.tensor([1, 3, 4]), torch.tensor([1, 2])).numpy(), 0.0, atol=1e-7)


def test_sampling_is_seeded_and_follows_the_proposal():
    negatives = Negatives.of(NegativesConfig("frequency", 20_000, 1.0), FREQ)
    first, again = (negatives.sample(np.random.default_rng(3)) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    counts = np.bincount(first, minlength=len(FREQ)) / len(first)
    np.testing.assert_allclose(counts, negatives.probs, atol=0.01)


@pytest.mark.parametrize("kind", ["mixed", "uniform", "in_batch"])
def test_logq_reads_the_sampled_and_in_batch_terms_from_the_negatives(kind):
    """log Q(j) = log(G p(j) [in-batch kinds] + S q(j)), from the same object the loader draws with."""
    negatives = Negatives.of(NegativesConfig(kind, 10, 0.75), FREQ)
    log_q = CandidateLogQ(torch.tensor(FREQ, dtype=torch.float64), negatives, "exact", 16, 0.1)
    ids, positives = torch.tensor([1, 2, 4]), torch.tensor([1, 2, 1, 4, 0])
    p, q = FREQ / FREQ.sum(), negatives.probs
    expected = [math.log((4 * p[j] if negatives.in_batch else 0) + 10 * q[j] * (kind != "in_batch")) for j in (1, 2, 4)]
    np.testing.assert_allclose(log_q(ids, positives).numpy(), expected, rtol=1e-6)


def test_bad_negatives_are_named():
    with pytest.raises(ConfigError, match="negatives.kind must be one of .*got 'popular'"):
        load_config(None, ["negatives.kind=popular"])
    with pytest.raises(ConfigError, match="negatives.alpha must be >= 0, got -1.0"):
        load_config(None, ["negatives.alpha=-1"])
    with pytest.raises(ConfigError, match="loss.in_batch is now negatives.kind"):
        load_config(None, ["loss.in_batch=false"])
    with pytest.raises(ValueError, match="negatives.kind=frequency: every item has zero weight"):
        Negatives.of(NegativesConfig("frequency"), np.zeros(4, dtype=np.int64))
