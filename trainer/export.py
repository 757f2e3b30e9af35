"""Export: a checkpoint (written by any number of ranks, with any sharding) -> an unsharded serving
artifact in the format of serving/format.py, readable without TorchRec. The bridge from training to
serving, so it imports both.

DCP reassembles every sharded table into one plain tensor while loading (`no_dist`), so the same code
reads a dev-mode checkpoint and one written by many ranks. Usage:

    python -m trainer.export --checkpoint CKPT_DIR --out OUT_DIR [section.key=value ...]
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
import pyarrow as pa
import torch

from config import ConfigError, JobConfig, load_config_text
from data import schema
from data.catalogue import Catalogue
from data.errors import DataError
from data.keys import ITEM_KEY, SEQUENCE_KEY, QueryLayout, candidate_keys
from data.loader import open_loader
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
from serving.plain import Features, PlainTowers, TableSpec
from serving.sequence import PlainSequenceTower, SequenceShape
from sharding.tables import table_configs
from storage import Location, StorageError, location, require_committed
from storage.commit import Staging, writing
from trainer import checkpoint
from trainer.evaluate import catalogue_embeddings
from trainer.model import table_specs


def kjt_features(kjt) -> Features:
    """A KeyedJaggedTensor's (lengths, values) per key, without copying values: plain-tower input."""
    lengths = kjt.lengths().long()
    values = torch.split(kjt.values(), kjt.length_per_key())
    counts = torch.split(lengths, [kjt.stride()] * len(kjt.keys()))
    return {key: (counts[i], values[i]) for i, key in enumerate(kjt.keys())}


def plain_towers(cfg: JobConfig, meta: schema.Metadata) -> PlainTowers:
    layout = QueryLayout.for_data(meta, cfg.loader.history_bags, cfg.loader.use_user_id)
    return PlainTowers(table_specs(table_configs(meta, cfg.loader, cfg.model)), layout.keys,
                       candidate_keys([f.name for f in meta.item_features]), cfg.model.hidden_dims,
                       cfg.model.output_dim)


class PlainWeights:
    """The plain towers as a checkpoint component, under the names the sharded model saves them with."""

    def __init__(self, model: PlainTowers):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"towers.ebc.embedding_bags.{name}.weight": bag.weight.detach()
                 for name, bag in self.model.tables.items()}
        for side in ("query_mlp", "candidate_mlp"):
            state.update({f"towers.{side}.{k}": v for k, v in getattr(self.model, side).state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """DCP loaded into the tensors of `state_dict()`, which are the model's own: nothing left to do."""


def tables_read_by(tables: list[TableSpec], keys: list[str]) -> list[TableSpec]:
    """The tables that some of `keys` read, each with only those features: what an exported query tower keeps."""
    wanted = set(keys)
    return [TableSpec(t.name, t.num_embeddings, t.dim, tuple(f for f in t.features if f in wanted))
            for t in tables if wanted & set(t.features)]


def query_side(model: PlainTowers) -> PlainTowers:
    """The query tower alone: only the tables (and features) the query reads, and the query MLP."""
    tables = tables_read_by(model.specs, model.query_keys)
    widths = [layer.out_features for layer in model.query_mlp if isinstance(layer, torch.nn.Linear)]
    tower = PlainTowers(tables, model.query_keys, [], widths[:-1], widths[-1])
    tower.load_state_dict({k: v for k, v in model.state_dict().items() if k in tower.state_dict()})
    return tower


def sequence_shape(cfg: JobConfig) -> SequenceShape:
    m = cfg.model
    return SequenceShape(m.item_dim, m.blocks, m.heads, m.dropout, list(m.hidden_dims), m.output_dim)


def plain_sequence_tower(cfg: JobConfig, meta: schema.Metadata, query_only: bool = False) -> PlainSequenceTower:
    """The transformer towers in plain PyTorch: every EBC table (item features embed the catalogue), or with
    `query_only` just the tables the query reads (the exported tower)."""
    layout = QueryLayout.for_data(meta, (), cfg.loader.use_user_id)
    tables = table_specs(table_configs(meta, cfg.loader, cfg.model))
    dims = {f: t.dim for t in tables for f in t.features}
    features = candidate_keys([f.name for f in meta.item_features])[1:]
    if query_only:
        tables = tables_read_by(tables, layout.keys)
    return PlainSequenceTower(sequence_shape(cfg), meta.item_vocab, cfg.loader.max_sequence_length, tables,
                              layout.keys, sum(dims[k] for k in features), tuple(cfg.loader.history_bags))


class PlainSequenceWeights:
    """`PlainSequenceTower` as a checkpoint component, under the sharded SequenceTwoTower's names."""

    def __init__(self, model: PlainSequenceTower):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"towers.ec.embeddings.item_ids.weight": self.model.items.weight.detach()}
        state.update({f"towers.ebc.embedding_bags.{name}.weight": bag.weight.detach()
                      for name, bag in self.model.tables.items()})
        state.update({f"towers.head.{k}": v for k, v in self.model.head.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """DCP loaded into the tensors of `state_dict()`, which are the model's own: nothing left to do."""


def split_queries(tower: PlainTowers | PlainSequenceTower, cfg: JobConfig, split: str,
                  limit: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Query embeddings of up to `limit` users of a split, and each one's seen items, as the training evaluator
    builds the queries (the transformer's from its sequence loader)."""
    sequence = isinstance(tower, PlainSequenceTower)
    loader = open_loader(cfg.data.path, cfg.loader, split, batch_size=min(limit, cfg.eval.batch_size),
                         query_tower="transformer" if sequence else "bags")
    queries, seen = [], []
    with torch.no_grad():
        for batch in loader.epoch(0):
            rows = batch.row_mask.nonzero().squeeze(1).numpy()
            features = kjt_features(batch.sparse)
            if sequence:
                history = batch.sequence[SEQUENCE_KEY]
                encoded = tower.query(history.lengths().long(), history.values(), features)
            else:
                encoded = tower.query(features)
            queries.append(encoded.numpy()[rows])
            offsets, values = batch.seen_offsets.numpy(), batch.seen_values.numpy()
            seen += [values[offsets[r]:offsets[r + 1]] for r in rows]
            if len(seen) >= limit:
                break
    return np.concatenate(queries)[:limit], seen[:limit]


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
    cfg = cfg or load_config_text(config_file.read_text(), str(config_file), overrides)
    state = checkpoint.read_state(path)
    meta = schema.Metadata.load(cfg.data.path)
    catalogue = Catalogue(cfg.data.path, meta)
    item_features = candidate_keys([f.name for f in meta.item_features])
    if cfg.model.query_tower == "transformer":
        model = plain_sequence_tower(cfg, meta)
        checkpoint.read({"model": PlainSequenceWeights(model)}, path, no_dist=True)
        model.eval()
        items = catalogue_embeddings(lambda kjt: model.candidate(kjt_features(kjt), ITEM_KEY, item_features[1:]),
                                     catalogue, [], item_features).numpy()
        tower = plain_sequence_tower(cfg, meta, query_only=True)
        tower.load_state_dict({k: v for k, v in model.state_dict().items() if k in tower.state_dict()})
        tower.eval()
    else:
        model = plain_towers(cfg, meta)
        checkpoint.read({"model": PlainWeights(model)}, path, no_dist=True)
        model.eval()
        items = catalogue_embeddings(lambda kjt: model.candidate(kjt_features(kjt)), catalogue, [],
                                     model.candidate_keys).numpy()
        tower = query_side(model)
    table = items_table(location(cfg.data.path), items)
    ids = table.column(schema.ITEM).to_numpy()
    vectors = items[ids]
    start = time.perf_counter()
    x = cfg.export
    index = ann.build(vectors, ids, x.index, x.hnsw_m, x.hnsw_ef_construction, x.hnsw_ef_search)
    build_s = time.perf_counter() - start
    queries, _ = split_queries(tower, cfg, "valid", x.recall_queries)
    _, approx = ann.search(index, queries, RECALL_K)
    _, exact = ann.exact_search(vectors, ids, queries, RECALL_K)
    state = state.get("loop", state)  # a step-N checkpoint nests the loop state; `best` holds it flat
    sequence = {}
    if isinstance(tower, PlainSequenceTower):
        sequence = {"shape": sequence_shape(cfg).as_dict(), "item_vocab": meta.item_vocab,
                    "max_length": cfg.loader.max_sequence_length,
                    "candidate_dim": model.head.candidate_mlp[0].in_features - cfg.model.item_dim}
    manifest = Manifest(
        dim=cfg.model.output_dim, temperature=cfg.loss.temperature, filter_seen=cfg.eval.filter_seen,
        query_tower=QueryTower(tables=tower.specs, query_keys=tower.query_keys, hidden_dims=cfg.model.hidden_dims,
                               output_dim=cfg.model.output_dim, history_bags=cfg.loader.history_bags,
                               max_history=meta.max_history, use_user_id=cfg.loader.use_user_id,
                               features=[{"name": f.name, "multi": f.multi}
                                         for f in meta.user_features + meta.context_features],
                               kind=cfg.model.query_tower, sequence=sequence),
        items={"count": len(ids)},
        index={"kind": x.index, "m": x.hnsw_m, "ef_construction": x.hnsw_ef_construction,
               "ef_search": x.hnsw_ef_search, "build_s": build_s, f"recall@{RECALL_K}": ann.recall_at_k(approx, exact),
               "recall_queries": len(queries), "recall_reference": "exact inner-product search, validation queries"},
        source={"checkpoint": absolute(path), "data": absolute(location(cfg.data.path)), "run_id": run_id,
                "state": {k: v for k, v in state.items() if k in ("epoch", "step", "valid")}})
    weights = io.BytesIO()
    torch.save(tower.state_dict(), weights)
    with writing(out, KIND) as staging:
        staging.write_bytes(QUERY_TOWER_FILE, weights.getvalue())
        staging.write_parquet(ITEM_EMBEDDINGS_FILE, table)
        staging.write_bytes(INDEX_FILE, ann.to_bytes(index))
        copy_id_maps(cfg, meta, staging)
        staging.write_text(MANIFEST_FILE, manifest.to_json())
    return manifest


def absolute(where: Location) -> str:
    return str(where.local_path.resolve()) if where.is_local else where.uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (step-N, or best-N), local or a "
                                                            "URI")
    parser.add_argument("--out", required=True, help="the export directory to write, local or a URI (replaced if it "
                                                     "exists)")
    parser.add_argument("overrides", nargs="*", help="section.key=value over the checkpoint's config, "
                                                     "e.g. data.path=... or export.hnsw_m=48")
    args = parser.parse_intermixed_args(argv)
    try:
        manifest = export(args.checkpoint, args.out, overrides=args.overrides)
    except (ConfigError, DataError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    index = manifest.index
    print(f"exported {manifest.items['count']} items to {args.out}; {index['kind']} index recall@{RECALL_K} "
          f"against exact search {index[f'recall@{RECALL_K}']:.4f} on {index['recall_queries']} validation queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
