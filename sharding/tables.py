"""The embedding tables of a job: which tables exist, their sizes, and which feature keys read each.

The model declares exactly these tables, and the planner shards exactly these, so this is the one
place that maps the feature-key contract (data/keys.py) and the prepared data's vocabularies onto
tables.
"""

from __future__ import annotations

from torchrec import EmbeddingBagConfig, EmbeddingConfig, PoolingType

from config import LoaderConfig, ModelConfig
from data.keys import ITEM_KEY, SEQUENCE_KEY, USER_ID, QueryLayout, candidate_key, history_key
from data.schema import Metadata

SHARED_ITEM_TABLE = "item_ids"  # not "items": that name clashes with ModuleDict.items
HISTORY_ITEM_TABLE = "history_item_ids"
CANDIDATE_ITEM_TABLE = "candidate_item_ids"
USER_TABLE = "user_ids"


def feature_table(feature: str) -> str:
    return f"{feature}_table"


def sequence_table_configs(meta: Metadata, model: ModelConfig) -> list[EmbeddingConfig]:
    """The EmbeddingCollection's tables: for the transformer tower, the one item table, read unpooled by the
    history (SEQUENCE_KEY) and by the candidates (ITEM_KEY); none for the bags tower."""
    if model.query_tower != "transformer":
        return []
    return [EmbeddingConfig(name=SHARED_ITEM_TABLE, embedding_dim=model.item_dim, num_embeddings=meta.item_vocab,
                            feature_names=[SEQUENCE_KEY, ITEM_KEY])]


def table_configs(meta: Metadata, loader: LoaderConfig, model: ModelConfig) -> list[EmbeddingBagConfig]:
    """The EBC's tables: for the bags tower the item table (shared by the history bags and the candidate id,
    or one per side); the optional user-id table, then one table per user, context and item feature."""
    history = [history_key(k) for k in loader.history_bags]

    def table(name: str, dim: int, vocab: int, features: list[str]) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=vocab, feature_names=features,
                                  pooling=PoolingType.MEAN)

    if model.query_tower == "transformer":
        tables = []
    elif model.share_item_table:
        tables = [table(SHARED_ITEM_TABLE, model.item_dim, meta.item_vocab, history + [ITEM_KEY])]
    else:
        tables = [table(HISTORY_ITEM_TABLE, model.item_dim, meta.item_vocab, history),
                  table(CANDIDATE_ITEM_TABLE, model.item_dim, meta.item_vocab, [ITEM_KEY])]
    if loader.use_user_id:
        tables.append(table(USER_TABLE, model.item_dim, meta.user_vocab, [USER_ID]))
    for name, _ in QueryLayout.for_data(meta, loader.history_bags, loader.use_user_id).features:
        tables.append(table(feature_table(name), model.feature_dim, feature_vocab(meta, name), [name]))
    for spec in meta.item_features:
        tables.append(table(feature_table(spec.name), model.feature_dim, spec.vocab_size, [candidate_key(spec.name)]))
    return tables


def feature_vocab(meta: Metadata, name: str) -> int:
    return next(f.vocab_size for f in meta.user_features + meta.context_features if f.name == name)
