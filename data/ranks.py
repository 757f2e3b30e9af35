"""How an epoch's rows are split between ranks: each rank reads a contiguous 1/world of the ordered
row stream, so every example is seen exactly once, and all ranks run the same number of batches."""

from __future__ import annotations

import numpy as np


def rank_slices(sizes: np.ndarray, order: np.ndarray, rank: int, world: int) -> list[tuple[int, int, int]]:
    """(unit, start, stop) row ranges of this rank: a contiguous 1/world of the ordered row stream."""
    total = int(sizes.sum())
    lo, hi = rank * total // world, (rank + 1) * total // world
    ends = np.cumsum(sizes[order])
    starts = ends - sizes[order]
    slices = []
    for unit, start, end in zip(order, starts, ends):
        a, b = max(start, lo), min(end, hi)
        if a < b:
            slices.append((int(unit), int(a - start), int(b - start)))
    return slices


def batches_per_rank(total: int, world: int, batch_size: int) -> int:
    """Batches every rank runs: enough for the largest rank's share, ceil(ceil(total / world) / batch)."""
    largest_share = (total + world - 1) // world
    return (largest_share + batch_size - 1) // batch_size
