"""What every query tower builds from: the job's feature tables, their plain-PyTorch specs, the catalogue's
candidate embeddings and a KJT's jagged features.

A tower module (towers/bags.py, towers/transformer.py) adds its item tables to `feature_tables`; the model
declares exactly the tables its tower lists and the planner shards exactly those, so the tower module and
this one are the only places that map the feature-key contract (data/keys.py) onto tables.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from config import LoaderConfig, ModelConfig
from data.batch import make_kjt
from data.catalogue import Catalogue
from data.keys import USER_ID, QueryLayout, candidate_key
from data.schema import Metadata
from serving.plain import Features, TableSpec

SHARED_ITEM_TABLE = "item_ids"  # not "items": that name clashes with ModuleDict.items
USER_TABLE = "user_ids"


def feature_table(feature: str) -> str:
    return f"{feature}_table"


def bag_table(name: str, dim: int, vocab: int, features: list[str]) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=vocab, feature_names=features,
                              pooling=PoolingType.MEAN)


def feature_tables(meta: Metadata, loader: LoaderConfig, model: ModelConfig) -> list[EmbeddingBagConfig]:
    """The EBC tables every tower has: the optional user-id table, then one per user, context and item feature."""
    tables = []
    if loader.use_user_id:
        tables.append(bag_table(USER_TABLE, model.item_dim, meta.user_vocab, [USER_ID]))
    for name, _ in QueryLayout.for_data(meta, loader.history_bags, loader.use_user_id).features:
        tables.append(bag_table(feature_table(name), model.feature_dim, feature_vocab(meta, name), [name]))
    for spec in meta.item_features:
        tables.append(bag_table(feature_table(spec.name), model.feature_dim, spec.vocab_size,
                                [candidate_key(spec.name)]))
    return tables


def feature_vocab(meta: Metadata, name: str) -> int:
    return next(f.vocab_size for f in meta.user_features + meta.context_features if f.name == name)


def table_specs(tables: list[EmbeddingBagConfig]) -> list[TableSpec]:
    """The tables as plain-PyTorch specs (serving/plain.py), for export and the benchmarks."""
    return [TableSpec(t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names)) for t in tables]


def tables_read_by(tables: list[TableSpec], keys: list[str]) -> list[TableSpec]:
    """The tables that some of `keys` read, each with only those features: what an exported query tower keeps."""
    wanted = set(keys)
    return [TableSpec(t.name, t.num_embeddings, t.dim, tuple(f for f in t.features if f in wanted))
            for t in tables if wanted & set(t.features)]


def kjt_features(kjt: KeyedJaggedTensor) -> Features:
    """A KeyedJaggedTensor's (lengths, values) per key, without copying values: plain-tower input."""
    lengths = kjt.lengths().long()
    values = torch.split(kjt.values(), kjt.length_per_key())
    counts = torch.split(lengths, [kjt.stride()] * len(kjt.keys()))
    return {key: (counts[i], values[i]) for i, key in enumerate(kjt.keys())}


def catalogue_embeddings(encode: Callable[[KeyedJaggedTensor], torch.Tensor], catalogue: Catalogue,
                         query_keys: list[str], candidate_keys: list[str], chunk: int = 8192) -> torch.Tensor:
    """(num_items + 1, dim) candidate-tower outputs of every item (row 0 is the padding id), in chunks so a
    large catalogue never needs one huge batch. `encode` maps a KJT whose query keys are empty to
    candidate embeddings: the sharded training towers and the exported plain ones both fit."""
    parts = []
    with torch.no_grad():
        for ids in catalogue.chunks(chunk):
            empty = (np.zeros(len(ids), dtype=np.int64), np.zeros(0, dtype=np.int64))
            parts.append(encode(make_kjt(query_keys + candidate_keys,
                                         [empty] * len(query_keys) + catalogue.candidate_arrays(ids))))
    return torch.cat(parts)
