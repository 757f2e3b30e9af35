"""Export: a checkpoint (written by any number of ranks, with any sharding) -> an unsharded serving
artifact in the format of serving/format.py, readable without TorchRec. The bridge from training to
serving, so it imports both.

DCP reassembles every sharded table into one plain tensor while loading (`no_dist`), so the same code
reads a dev-mode checkpoint and one written by many ranks. Usage (trainer/export/__main__.py):

    python -m trainer.export --checkpoint CKPT_DIR --out OUT_DIR [section.key=value ...]"""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import torch

import towers
from config import JobConfig, load_config_text
from data import schema
from data.catalogue import Catalogue
from data.errors import DataError
from serving import index as ann
from serving.format import (
    EMBEDDING_COLUMN,
    ID_MAPS_DIR,
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    KIND,
    MANIFEST_FILE,
    QUERY_TOWER_FILE,
    RECALL_K,
    USER_MAP,
    Manifest,
    QueryTower,
)
from storage import Location, StorageError, location, require_committed
from storage.commit import Staging, writing
from trainer.checkpointing import checkpoint
from trainer.export.queries import split_queries


def items_table(directory: Location, embeddings: np.ndarray) -> pa.Table:
    catalogue = (directory / schema.ITEMS_FILE).read_parquet()
    keep = [c for c in (schema.ITEM, schema.RAW_ID, schema.TITLE, schema.FREQ) if c in catalogue.column_names]
    table = catalogue.select(keep)
    ids = table.column(schema.ITEM).to_numpy()
    vectors = embeddings[ids].astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return table.append_column(EMBEDDING_COLUMN, column)


def copy_id_maps(cfg: JobConfig, meta: schema.Metadata, out: Staging) -> None:
    names = [f.name for f in meta.user_features + meta.context_features]
    names += [USER_MAP] if cfg.loader.use_user_id else []
    source = location(cfg.data.path) / schema.ID_MAPS_DIR
    for name in names:
        if (source / f"{name}.parquet").is_file():
            out.write_bytes(f"{ID_MAPS_DIR}/{name}.parquet", (source / f"{name}.parquet").read_bytes())


def export(path: "str | Location", out: "str | Location", cfg: JobConfig | None = None, overrides: list[str] = (),
           run_id: str | None = None) -> Manifest:
    """Writes the export, committed with a manifest at the end (storage/commit.py), and returns its description.
    Without `cfg`, the model is rebuilt from the config saved in the checkpoint, plus `overrides`."""
    path, out = location(path), location(out)
    try:
        require_committed(path, checkpoint.KIND, "")
    except StorageError as err:
        raise DataError(err.uri, None, "a complete checkpoint directory (step-N or best-N under checkpoint.dir)",
                        err.problem) from None
    config_file = path / checkpoint.CONFIG_FILE
    cfg = cfg or load_config_text(config_file.read_text(), str(config_file), overrides, saved=True)
    tower = towers.of(cfg)
    state = checkpoint.read_state(path)
    meta = schema.Metadata.load(cfg.data.path)
    catalogue = Catalogue(cfg.data.path, meta)
    exported = tower.export(cfg, meta, catalogue, lambda weights: checkpoint.read({"model": weights}, path,
                                                                                  no_dist=True))
    items, query_tower = exported.item_embeddings, exported.query_tower
    table = items_table(location(cfg.data.path), items)
    ids = table.column(schema.ITEM).to_numpy()
    vectors = items[ids]
    start = time.perf_counter()
    x = cfg.export
    index = ann.build(vectors, ids, x.index, x.hnsw_m, x.hnsw_ef_construction, x.hnsw_ef_search)
    build_s = time.perf_counter() - start
    queries, _ = split_queries(tower, query_tower, cfg, "valid", x.recall_queries)
    _, approx = ann.search(index, queries, RECALL_K)
    _, exact = ann.exact_search(vectors, ids, queries, RECALL_K)
    state = state.get("loop", state)  # a step-N checkpoint nests the loop state; `best` holds it flat
    manifest = Manifest(
        dim=cfg.model.output_dim, temperature=cfg.loss.temperature, filter_seen=cfg.eval.filter_seen,
        query_tower=QueryTower(tables=query_tower.specs, query_keys=query_tower.query_keys,
                               hidden_dims=cfg.model.hidden_dims,
                               output_dim=cfg.model.output_dim, history_bags=cfg.loader.history_bags,
                               max_history=meta.max_history, use_user_id=cfg.loader.use_user_id,
                               features=[{"name": f.name, "multi": f.multi}
                                         for f in meta.user_features + meta.context_features],
                               kind=tower.name, model=type(query_tower).__name__, sequence=exported.manifest),
        items={"count": len(ids)},
        index={"kind": x.index, "m": x.hnsw_m, "ef_construction": x.hnsw_ef_construction,
               "ef_search": x.hnsw_ef_search, "build_s": build_s, f"recall@{RECALL_K}": ann.recall_at_k(approx, exact),
               "recall_queries": len(queries), "recall_reference": "exact inner-product search, validation queries"},
        source={"checkpoint": absolute(path), "data": absolute(location(cfg.data.path)), "run_id": run_id,
                "state": {k: v for k, v in state.items() if k in ("epoch", "step", "valid")}})
    weights = io.BytesIO()
    torch.save(query_tower.state_dict(), weights)
    with writing(out, KIND) as staging:
        staging.write_bytes(QUERY_TOWER_FILE, weights.getvalue())
        staging.write_parquet(ITEM_EMBEDDINGS_FILE, table)
        staging.write_bytes(INDEX_FILE, ann.to_bytes(index))
        copy_id_maps(cfg, meta, staging)
        staging.write_text(MANIFEST_FILE, manifest.to_json())
    return manifest


def absolute(where: Location) -> str:
    return str(where.local_path.resolve()) if where.is_local else where.uri
