"""Export: a checkpoint (written by any number of ranks, with any sharding) -> an unsharded serving
artifact, readable by trainer/serving.py without TorchRec.

    <out>/export.json      architecture, query semantics, provenance, index settings and measured recall
    <out>/query_tower.pt   the plain-PyTorch query tower's state dict (torch.load(weights_only=True))
    <out>/items.parquet    item, raw_id, title, freq, embedding (L2-normalised, list<float32>)
    <out>/items.faiss      ANN index over the embeddings, inner product (ids = item)
    <out>/id_maps/         raw value -> id of each query feature (and of users, if the model has a user table)

DCP reassembles every sharded table into one plain tensor while loading (`no_dist`), so the same code
reads a dev-mode checkpoint and one written by many ranks. Usage:

    python -m trainer.export --checkpoint CKPT_DIR --out OUT_DIR [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed.checkpoint as dcp
from tqdm import tqdm

from data import schema
from data.errors import DataError
from data.loader import Catalogue, ExampleLoader, candidate_keys, query_keys
from trainer import index as ann
from trainer.checkpoint import CONFIG_FILE, STATE_FILE
from trainer.config import ConfigError, JobConfig, load_config
from trainer.model import table_configs, table_specs
from trainer.plain import PlainTowers, TableSpec, kjt_features
from trainer.serving import EXPORT_FILE, ID_MAPS_DIR, INDEX_FILE, ITEMS_FILE, QUERY_TOWER_FILE, USER_MAP

FORMAT_VERSION = 1
CHUNK = 8192
RECALL_K = 10


def plain_towers(cfg: JobConfig, meta: schema.Metadata) -> PlainTowers:
    return PlainTowers(table_specs(table_configs(meta, cfg.loader, cfg.model)), query_keys(meta, cfg.loader),
                       candidate_keys(meta), cfg.model.hidden_dims, cfg.model.output_dim)


def load_weights(model: PlainTowers, checkpoint: Path) -> None:
    """Fills `model` in place from the checkpoint's `model.towers.*` entries, whatever their sharding."""
    state = {f"model.towers.ebc.embedding_bags.{name}.weight": bag.weight.detach()
             for name, bag in model.tables.items()}
    for side in ("query_mlp", "candidate_mlp"):
        for key, tensor in getattr(model, side).state_dict().items():
            state[f"model.towers.{side}.{key}"] = tensor
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)


def query_side(model: PlainTowers) -> PlainTowers:
    """The query tower alone: only the tables (and features) the query reads, and the query MLP."""
    keys = set(model.query_keys)
    tables = [TableSpec(t.name, t.num_embeddings, t.dim, tuple(f for f in t.features if f in keys))
              for t in model.specs if keys & set(t.features)]
    widths = [layer.out_features for layer in model.query_mlp if isinstance(layer, torch.nn.Linear)]
    tower = PlainTowers(tables, model.query_keys, [], widths[:-1], widths[-1])
    tower.load_state_dict({k: v for k, v in model.state_dict().items() if k in tower.state_dict()})
    return tower


def item_embeddings(model: PlainTowers, catalogue: Catalogue, num_items: int) -> np.ndarray:
    """(num_items + 1, dim) candidate-tower outputs; row 0 is the padding id."""
    out = []
    with torch.no_grad():
        for lo in tqdm(range(0, num_items + 1, CHUNK), desc="item embeddings", unit="chunk", leave=False):
            ids = np.arange(lo, min(lo + CHUNK, num_items + 1), dtype=np.int64)
            arrays = catalogue.candidate_arrays(ids)
            features = {k: (torch.from_numpy(lengths), torch.from_numpy(values))
                        for k, (lengths, values) in zip(model.candidate_keys, arrays)}
            out.append(model.candidate(features).numpy())
    return np.concatenate(out)


def split_queries(tower: PlainTowers, cfg: JobConfig, split: str, limit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Query embeddings of up to `limit` users of a split, and each one's seen items."""
    loader = ExampleLoader(cfg.data.path, replace(cfg.loader, batch_size=min(limit, cfg.eval.batch_size),
                                                  num_negatives=0), split)
    queries, seen = [], []
    with torch.no_grad():
        for batch in loader.epoch(0):
            rows = batch.row_mask.nonzero().squeeze(1).numpy()
            queries.append(tower.query(kjt_features(batch.sparse)).numpy()[rows])
            offsets, values = batch.seen_offsets.numpy(), batch.seen_values.numpy()
            seen += [values[offsets[r]:offsets[r + 1]] for r in rows]
            if len(seen) >= limit:
                break
    return np.concatenate(queries)[:limit], seen[:limit]


def items_table(directory: Path, embeddings: np.ndarray) -> pa.Table:
    catalogue = pq.read_table(directory / schema.ITEMS_FILE)
    keep = [c for c in (schema.ITEM, schema.RAW_ID, schema.TITLE, schema.FREQ) if c in catalogue.column_names]
    table = catalogue.select(keep)
    ids = table.column(schema.ITEM).to_numpy()
    vectors = embeddings[ids].astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return table.append_column("embedding", column)


def copy_id_maps(cfg: JobConfig, meta: schema.Metadata, out: Path) -> None:
    names = [f.name for f in meta.user_features + meta.context_features]
    names += [USER_MAP] if cfg.loader.use_user_id else []
    source = Path(cfg.data.path) / schema.ID_MAPS_DIR
    (out / ID_MAPS_DIR).mkdir()
    for name in names:
        if (source / f"{name}.parquet").is_file():
            shutil.copy(source / f"{name}.parquet", out / ID_MAPS_DIR / f"{name}.parquet")


def export(checkpoint: str | Path, out: str | Path, cfg: JobConfig | None = None, overrides: list[str] = (),
           run_id: str | None = None) -> dict:
    """Writes the export atomically (temp dir, then rename) and returns its export.json. Without `cfg`,
    the model is rebuilt from the config saved in the checkpoint, plus `overrides`."""
    checkpoint, out = Path(checkpoint), Path(out)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (checkpoint / name).is_file():
            raise DataError(checkpoint / name, None, "a complete checkpoint directory (step-N or best)",
                            "no such file")
    cfg = cfg or load_config(checkpoint / CONFIG_FILE, overrides)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    meta = schema.Metadata.load(cfg.data.path)
    model = plain_towers(cfg, meta)
    load_weights(model, checkpoint)
    model.eval()
    items = item_embeddings(model, Catalogue(Path(cfg.data.path), meta), meta.num_items)
    table = items_table(Path(cfg.data.path), items)
    ids = table.column(schema.ITEM).to_numpy()
    vectors = items[ids]
    start = time.perf_counter()
    x = cfg.export
    index = ann.build(vectors, ids, x.index, x.hnsw_m, x.hnsw_ef_construction, x.hnsw_ef_search)
    build_s = time.perf_counter() - start
    queries, _ = split_queries(model, cfg, "valid", x.recall_queries)
    _, approx = ann.search(index, queries, RECALL_K)
    _, exact = ann.exact_search(vectors, ids, queries, RECALL_K)
    tower = query_side(model)
    info = {
        "format_version": FORMAT_VERSION,
        "metric": "inner product on L2-normalised vectors (the training score times the temperature)",
        "dim": cfg.model.output_dim,
        "temperature": cfg.loss.temperature,
        "filter_seen": cfg.eval.filter_seen,  # recommend leaves the history out of the results when true
        "query_tower": {"tables": [t.as_dict() for t in tower.specs], "query_keys": tower.query_keys,
                        "hidden_dims": cfg.model.hidden_dims, "output_dim": cfg.model.output_dim,
                        "history_bags": cfg.loader.history_bags, "max_history": meta.max_history,
                        "use_user_id": cfg.loader.use_user_id,
                        "features": [{"name": f.name, "multi": f.multi}
                                     for f in meta.user_features + meta.context_features]},
        "items": {"count": len(ids)},
        "index": {"kind": x.index, "m": x.hnsw_m, "ef_construction": x.hnsw_ef_construction,
                  "ef_search": x.hnsw_ef_search, "build_s": build_s,
                  f"recall@{RECALL_K}": ann.recall_at_k(approx, exact),
                  "recall_queries": len(queries), "recall_reference": "exact inner-product search, validation queries"},
        "source": {"checkpoint": str(checkpoint.resolve()), "data": str(Path(cfg.data.path).resolve()),
                   "run_id": run_id, "state": {k: v for k, v in state.items() if k in ("epoch", "step", "valid")}},
    }
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(tower.state_dict(), tmp / QUERY_TOWER_FILE)
    pq.write_table(table, tmp / ITEMS_FILE)
    ann.save(index, tmp / INDEX_FILE)
    copy_id_maps(cfg, meta, tmp)
    (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (step-N, or best)")
    parser.add_argument("--out", required=True, help="the export directory to write (replaced if it exists)")
    parser.add_argument("overrides", nargs="*", help="section.key=value over the checkpoint's config, "
                                                     "e.g. data.path=... or export.hnsw_m=48")
    args = parser.parse_intermixed_args(argv)
    try:
        info = export(args.checkpoint, args.out, overrides=args.overrides)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    index = info["index"]
    print(f"exported {info['items']['count']} items to {args.out}; {index['kind']} index recall@{RECALL_K} "
          f"against exact search {index[f'recall@{RECALL_K}']:.4f} on {index['recall_queries']} validation queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
