"""Query embeddings of a split through an exported query tower, as the evaluator builds the queries: what export
measures the ANN index's recall on."""

from __future__ import annotations

import numpy as np
import torch

from config import JobConfig
from data.loader import open_loader
from towers import Tower


def split_queries(tower: Tower, query_tower: torch.nn.Module, cfg: JobConfig, split: str,
                  limit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Query embeddings of up to `limit` users of a split by the exported query tower, and each one's seen items,
    as the training evaluator builds the queries (through the tower's loader)."""
    loader = open_loader(cfg.data.path, cfg.loader, split, batch_size=min(limit, cfg.eval.batch_size),
                         layout=tower.layout)
    queries, seen = [], []
    with torch.no_grad():
        for batch in loader.epoch(0):
            rows = batch.row_mask.nonzero().squeeze(1).numpy()
            queries.append(tower.encode_queries(query_tower, batch).numpy()[rows])
            offsets, values = batch.seen_offsets.numpy(), batch.seen_values.numpy()
            seen += [values[offsets[r]:offsets[r + 1]] for r in rows]
            if len(seen) >= limit:
                break
    return np.concatenate(queries)[:limit], seen[:limit]
