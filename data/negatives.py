"""A query's negatives, in one object: the loader draws from it, the loss reads from it which columns are negatives
and the proposal q its logQ needs, and the benches build it the same way (`Negatives.of`).

Kinds (`negatives.kind`):
- in_batch: the other rows' positives of the global batch; nothing is drawn.
- uniform: `num_sampled` items per batch, drawn from the whole catalogue alike; no in-batch columns.
- frequency: `num_sampled` items drawn with q(j) proportional to count(j) ** alpha; no in-batch columns.
- mixed: in-batch plus `num_sampled` drawn as `frequency` (Yang et al. 2020, "Mixed negative sampling"); alpha 0
  draws uniformly.
- catalogue: every item of the catalogue, once, at every step: the exact full softmax. Each item is then a
  candidate exactly once per batch (Q = 1, log Q = 0, so logQ changes nothing), and a row's own item is its
  positive, never a negative (the loss masks or merges its other copy). No in-batch columns.

Items never seen in training have count 0, so alpha > 0 never draws them; alpha 0 draws every item (0 ** 0 = 1).
The pad id 0 is never drawn. With S drawn per batch, item j is among them S q(j) times in expectation, which
is the sampled part of Q(j) in logQ (trainer/loss/logq.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from config import NegativesConfig


def proposal(freq: np.ndarray, kind: str, alpha: float) -> np.ndarray:
    """q over dense item ids (`freq` is indexed by them): zeros for in_batch, which draws nothing."""
    if kind == "in_batch":
        return np.zeros(len(freq), dtype=np.float64)
    weights = np.ones(len(freq)) if kind in ("uniform", "catalogue") else freq.astype(np.float64) ** alpha
    weights[0] = 0.0
    if weights.sum() <= 0:
        raise ValueError(f"negatives.kind={kind}: every item has zero weight (no training frequencies?)")
    return weights / weights.sum()


@dataclass
class Negatives:
    kind: str
    in_batch: bool  # the other rows' positives are negatives
    num_sampled: int  # drawn from the catalogue per batch
    probs: np.ndarray  # q(j), the proposal `sample` draws from
    cdf: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cdf = np.cumsum(self.probs)

    @classmethod
    def of(cls, cfg: NegativesConfig, freq: np.ndarray) -> Negatives:
        return cls(cfg.kind, cfg.in_batch, cfg.per_batch(len(freq) - 1), proposal(freq, cfg.kind, cfg.alpha))

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """This batch's `num_sampled` ids, drawn with replacement from `probs`."""
        if not self.num_sampled:
            return np.zeros(0, dtype=np.int64)
        if self.kind == "catalogue":
            return np.arange(1, len(self.probs), dtype=np.int64)
        ids = np.searchsorted(self.cdf, rng.random(self.num_sampled) * self.cdf[-1], side="right")
        return np.minimum(ids, len(self.cdf) - 1).astype(np.int64)

    def expected_sampled(self) -> np.ndarray:
        """How many times each item is among a batch's drawn negatives, in expectation: S q(j)."""
        return self.num_sampled * self.probs
