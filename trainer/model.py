"""Two-tower retrieval model over one EmbeddingBagCollection.

The query tower pools history bags (last-1, last-k, whole history: one shared item table), the
optional user id, user and context features; the candidate tower pools the item id and item
features. Both end in an MLP and L2 normalisation. All tables live in one EBC declared on the meta
device (DMP materialises it sharded) and are looked up with one call on `batch.sparse`, so
TrainPipelineSparseDist can prefetch and input-dist the whole lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from data.batch import ITEM_KEY, TrainBatch, candidate_key, history_key
from data.loader import LoaderConfig, candidate_keys, query_keys
from data.schema import Metadata
from trainer.config import ModelConfig
from trainer.plain import TableSpec, mlp

SHARED_ITEM_TABLE = "item_ids"  # not "items": that name clashes with ModuleDict.items


def table_configs(meta: Metadata, loader: LoaderConfig, cfg: ModelConfig) -> list[EmbeddingBagConfig]:
    history = [history_key(k) for k in loader.history_bags]

    def table(name: str, dim: int, vocab: int, features: list[str]) -> EmbeddingBagConfig:
        return EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=vocab, feature_names=features,
                                  pooling=PoolingType.MEAN)

    if cfg.share_item_table:
        tables = [table(SHARED_ITEM_TABLE, cfg.item_dim, meta.item_vocab, history + [ITEM_KEY])]
    else:
        tables = [table("history_item_ids", cfg.item_dim, meta.item_vocab, history),
                  table("candidate_item_ids", cfg.item_dim, meta.item_vocab, [ITEM_KEY])]
    if loader.use_user_id:
        tables.append(table("user_ids", cfg.item_dim, meta.user_vocab, ["user_id"]))
    for spec in meta.user_features + meta.context_features:
        tables.append(table(f"{spec.name}_table", cfg.feature_dim, spec.vocab_size, [spec.name]))
    for spec in meta.item_features:
        tables.append(table(f"{spec.name}_table", cfg.feature_dim, spec.vocab_size, [candidate_key(spec.name)]))
    return tables


def table_specs(tables: list[EmbeddingBagConfig]) -> list[TableSpec]:
    return [TableSpec(t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names)) for t in tables]


class TwoTower(nn.Module):
    def __init__(self, meta: Metadata, loader: LoaderConfig, cfg: ModelConfig, device: torch.device):
        super().__init__()
        self.tables = table_configs(meta, loader, cfg)
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device("meta"))
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
        self.query_keys = query_keys(meta, loader)
        self.candidate_keys = candidate_keys(meta)
        self.query_mlp = mlp(sum(dims[k] for k in self.query_keys), cfg.hidden_dims, cfg.output_dim, device)
        self.candidate_mlp = mlp(sum(dims[k] for k in self.candidate_keys), cfg.hidden_dims, cfg.output_dim, device)

    def towers(self, features: KeyedJaggedTensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised query embeddings of rows [0, num_queries) and candidate embeddings of all rows."""
        pooled = self.ebc(features).to_dict()
        query = torch.cat([pooled[k][:num_queries] for k in self.query_keys], dim=1)
        candidate = torch.cat([pooled[k] for k in self.candidate_keys], dim=1)
        return (F.normalize(self.query_mlp(query), dim=-1), F.normalize(self.candidate_mlp(candidate), dim=-1))


class RetrievalModel(nn.Module):
    """Towers plus loss: forward(batch) -> (loss, stats), the contract TrainPipelineSparseDist expects."""

    def __init__(self, towers: TwoTower, loss_fn):
        super().__init__()
        self.towers = towers
        self.loss_fn = loss_fn

    def forward(self, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, candidates = self.towers.towers(batch.sparse, batch.row_mask.shape[0])
        loss = self.loss_fn(query, candidates, batch)
        return loss, {"loss": loss.detach()}
