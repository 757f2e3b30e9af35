"""ANN index over item embeddings, with the training metric: inner product on L2-normalised vectors.

The towers already normalise their outputs, so inner product is cosine and ranks exactly as the
training scores do (the temperature only rescales). Ids stored in the index are dense item ids.
"""

from __future__ import annotations

import faiss
import numpy as np


def build(vectors: np.ndarray, ids: np.ndarray, kind: str, m: int = 32, ef_construction: int = 200,
          ef_search: int = 128) -> faiss.Index:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = ef_construction
        inner.hnsw.efSearch = ef_search
    elif kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    else:
        raise ValueError(f"index kind must be hnsw or flat, got '{kind}'")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def set_ef_search(index: faiss.Index, ef_search: int) -> None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if isinstance(inner, faiss.IndexHNSWFlat):
        inner.hnsw.efSearch = ef_search


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), best first; id -1 where the index holds fewer than k items."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                 max_scores: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product: the reference the index is checked against. Queries go
    in chunks of at most `max_scores` scores, so a large catalogue never needs a full score matrix."""
    vectors = vectors.astype(np.float32, copy=False)
    k = min(k, len(ids))
    step = max(1, max_scores // max(len(ids), 1))
    out_scores, out_ids = [], []
    for lo in range(0, len(queries), step):
        scores = queries[lo:lo + step].astype(np.float32) @ vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        out_scores.append(np.take_along_axis(top_scores, order, 1))
        out_ids.append(ids[np.take_along_axis(top, order, 1)])
    return np.concatenate(out_scores), np.concatenate(out_ids)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the index also returned."""
    hits = [len(np.intersect1d(a, e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / exact.shape[1]


def to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def from_bytes(data: bytes, ef_search: int, where: str) -> faiss.Index:
    """An index written by `to_bytes`; anything else is a ValueError naming `where`, not a faiss traceback."""
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as err:
        reason = next((line for line in str(err).splitlines() if line.strip()), "unreadable")[:200]
        raise ValueError(f"{where}: not a faiss index ({reason}); export again") from None
    set_ef_search(index, ef_search)
    return index
