"""Two-tower retrieval model over one EmbeddingBagCollection.

The query tower pools history bags (last-1, last-k, whole history: one shared item table), the
optional user id, user and context features; the candidate tower pools the item id and item
features. Both end in an MLP and L2 normalisation. All tables (sharding/tables.py) live in one EBC
declared on the meta device (DMP materialises it sharded) and are looked up with one call on
`batch.sparse`, so TrainPipelineSparseDist can prefetch and input-dist the whole lookup.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from config import LoaderConfig, ModelConfig
from data.batch import TrainBatch
from data.keys import QueryLayout, candidate_keys
from data.schema import Metadata
from serving.plain import TableSpec, mlp
from sharding.tables import table_configs


def table_specs(tables: list[EmbeddingBagConfig]) -> list[TableSpec]:
    """The tables as plain-PyTorch specs (serving/plain.py), for export and the benchmark."""
    return [TableSpec(t.name, t.num_embeddings, t.embedding_dim, tuple(t.feature_names)) for t in tables]


class TwoTower(nn.Module):
    def __init__(self, meta: Metadata, loader: LoaderConfig, cfg: ModelConfig, device: torch.device):
        super().__init__()
        self.tables = table_configs(meta, loader, cfg)
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device("meta"))
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
        self.query_keys = QueryLayout.for_data(meta, loader.history_bags, loader.use_user_id).keys
        self.candidate_keys = candidate_keys([f.name for f in meta.item_features])
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
