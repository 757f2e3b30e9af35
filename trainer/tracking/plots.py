"""The run's plots, logged to MLflow as images: people would rather look than read.

- metric@K of the model against the popularity baseline (test split);
- a 2-D projection (PCA) of the exported item embeddings, coloured by an item feature;
- item popularity against how often items are recommended, the picture of popularity bias
  (and of what logQ does to it).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import towers  # noqa: E402
from data import schema  # noqa: E402
from data.ragged import list_offsets_values  # noqa: E402
from serving import index as ann  # noqa: E402
from serving.format import ITEM_EMBEDDINGS_FILE  # noqa: E402
from serving.model import ExportedModel  # noqa: E402
from storage import Location, location  # noqa: E402
from trainer.export.artifact import split_queries  # noqa: E402

MAX_LABELS = 8  # colours in the embedding map; rarer values are grouped as "other"
MAX_QUERIES = 20_000  # test users behind the popularity-bias plot


def metric_curves(model: dict[str, float], popularity: dict[str, float], ks: list[int]) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, name in zip(axes, ("hr", "ndcg", "coverage")):
        for label, metrics, style in (("two-tower", model, "o-"), ("popularity", popularity, "s--")):
            ax.plot(ks, [metrics[f"{name}@{k}"] for k in ks], style, label=label)
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_title(f"{name.upper()}@K (test)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    return centred @ components[:2].T


def embedding_map(vectors: np.ndarray, labels: list[str], feature: str, max_points: int = 20_000,
                  seed: int = 0) -> Figure:
    """PCA of (a sample of) the item embeddings; the most common label values get a colour each."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(vectors))[:max_points]
    points = pca_2d(vectors[pick])
    picked = np.array(labels, dtype=object)[pick]
    values, counts = np.unique(picked, return_counts=True)
    top = list(values[np.argsort(-counts)][:MAX_LABELS])
    fig, ax = plt.subplots(figsize=(7, 6))
    others = ~np.isin(picked, top)
    ax.scatter(points[others, 0], points[others, 1], s=4, c="lightgrey", label="other")
    for value in top:
        mask = picked == value
        ax.scatter(points[mask, 0], points[mask, 1], s=6, label=str(value))
    ax.set_title(f"item embeddings, PCA, coloured by {feature}")
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def popularity_vs_recommended(freq: np.ndarray, recommended: np.ndarray, k: int, bins: int = 10) -> Figure:
    """Items in popularity deciles: their share of training interactions against their share of
    top-K recommendations. A model without popularity bias would put the two bars level."""
    order = np.argsort(-freq, kind="stable")
    groups = np.array_split(order, bins)
    interactions = np.array([freq[g].sum() for g in groups]) / max(freq.sum(), 1)
    shown = np.array([recommended[g].sum() for g in groups]) / max(recommended.sum(), 1)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(bins)
    ax.bar(x - 0.2, interactions, 0.4, label="share of training interactions")
    ax.bar(x + 0.2, shown, 0.4, label=f"share of top-{k} recommendations (test users)")
    ax.set_xticks(x, [f"{i * 100 // bins}-{(i + 1) * 100 // bins}%" for i in range(bins)])
    ax.set_xlabel("items by training popularity (most popular first)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("popularity bias")
    fig.tight_layout()
    return fig


def recommendation_counts(model, queries: np.ndarray, seen: list[np.ndarray], k: int) -> np.ndarray:
    """How often each row of the export appears in the top k of the queries, seen items excluded,
    retrieved through the export's own index (the serving path)."""
    most_seen = max((len(s) for s in seen), default=0)
    _, ids = ann.search(model.index, queries, k + most_seen)
    counts = np.zeros(len(model.item_ids), dtype=np.int64)
    for row, already in zip(ids, seen):
        kept = row[(row >= 0) & ~np.isin(row, already)][:k]
        counts[[model.row_of_id[int(i)] for i in kept]] += 1
    return counts


def item_labels(data: "str | Location", item_ids: np.ndarray, meta: schema.Metadata) -> tuple[str, list[str]]:
    """The first value of the genre feature (else of the first item feature) of every item, as raw
    text; without item features, the item's popularity decile."""
    data = location(data)
    items = (data / schema.ITEMS_FILE).read_parquet()
    row_of = {int(i): r for r, i in enumerate(items.column(schema.ITEM).to_numpy())}
    rows = np.array([row_of[int(i)] for i in item_ids])
    names = [f.name for f in meta.item_features]
    if not names:
        freq = items.column(schema.FREQ).to_numpy()[rows]
        decile = np.argsort(np.argsort(-freq, kind="stable")) * 10 // len(freq)
        return "popularity decile", [f"decile {d + 1}" for d in decile]
    feature = next((n for n in names if "genre" in n), names[0])
    column = items.column(feature)
    multi = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    first = first_values(column) if multi else column.to_numpy()
    id_map = data / schema.ID_MAPS_DIR / f"{feature}.parquet"
    raw = dict(zip(*(id_map.read_parquet().column(c).to_pylist() for c in ("id", "raw")))) if id_map.is_file() else {}
    return feature, [str(raw.get(int(first[r]), first[r])) for r in rows]


def first_values(column) -> np.ndarray:
    """First element of each list (0, the padding id, for an empty list)."""
    offsets, values = list_offsets_values(column)
    lengths = np.diff(offsets)
    first = np.zeros(len(lengths), dtype=np.int64)
    first[lengths > 0] = values[offsets[:-1][lengths > 0]]
    return first


def plots(cfg, meta: schema.Metadata, summary: dict) -> dict[str, np.ndarray]:
    """{artifact file: RGBA image} at the end of training. The last two read the export: the selected
    epoch's model, through the serving path."""
    images = {}
    if summary.get("popularity_test"):
        fig = metric_curves(summary["test"], summary["popularity_test"], cfg.eval.ks)
        images["plots/metric_at_k.png"] = figure_rgba(fig)
    if "export" not in summary:
        return images
    model = ExportedModel(summary["export"]["dir"])
    feature, labels = item_labels(location(cfg.data.path), model.item_ids, meta)
    images["plots/item_embeddings.png"] = figure_rgba(embedding_map(model.embeddings, labels, feature, seed=cfg.seed))
    k = min(cfg.eval.ks)
    queries, seen = split_queries(towers.of(cfg), model.tower, cfg, "test", MAX_QUERIES)
    counts = recommendation_counts(model, queries, seen, k)
    freq = (model.directory / ITEM_EMBEDDINGS_FILE).read_parquet([schema.FREQ]).column(schema.FREQ).to_numpy()
    images["plots/popularity_bias.png"] = figure_rgba(popularity_vs_recommended(freq, counts, k))
    return images


def figure_rgba(fig: Figure) -> np.ndarray:
    """The rendered figure as an RGBA array (what MlflowClient.log_image takes); closes the figure."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba()).copy()
    plt.close(fig)
    return image
