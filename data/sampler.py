"""Mixed-negative proposal q over the catalogue: uniform, or unigram counts ** alpha.

The loss needs q(j) for logQ (Q(j) = G p(j) + S q(j)); it reads `probs`, the same array `sample` draws from.
"""

from __future__ import annotations

import numpy as np


class NegativeSampler:
    def __init__(self, freq: np.ndarray, mode: str, alpha: float):
        """`freq` is indexed by dense item id; id 0 (padding) is never drawn."""
        weights = np.ones(len(freq), dtype=np.float64) if mode == "uniform" else freq.astype(np.float64) ** alpha
        if mode != "uniform":
            weights[freq == 0] = 0.0
        weights[0] = 0.0
        if weights.sum() <= 0:
            raise ValueError("negative sampler: every item has zero weight (no training frequencies?)")
        self.probs = weights / weights.sum()
        self.cdf = np.cumsum(self.probs)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n ids drawn with replacement from `probs`."""
        ids = np.searchsorted(self.cdf, rng.random(n) * self.cdf[-1], side="right")
        return np.minimum(ids, len(self.cdf) - 1).astype(np.int64)
