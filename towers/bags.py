"""The bag tower: the history as mean-pooled bags (last-1, last-k, all) in one EmbeddingBagCollection.

The query tower pools the history bags (`loader.history_bags`, one item table shared with the candidate id
unless `model.tower.share_item_table` is false), the optional user id, user and context features; the
candidate tower pools the item id and item features. Both end in an MLP and L2 normalisation. Every table
lives in one EBC declared on the meta device and is looked up with one call on `batch.sparse`, so
TrainPipelineSparseDist prefetches and input-dists the whole lookup. Serving runs `serving.plain.PlainTowers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from config import ConfigError, JobConfig
from data.batch import TrainBatch
from data.catalogue import Catalogue
from data.keys import ITEM_KEY, QueryLayout, candidate_keys, history_key
from data.loader import POOLED
from data.schema import Metadata
from serving.plain import PlainTowers, first_copies, mlp
from towers.base import Exported, Tower
from towers.shared import (
    SHARED_ITEM_TABLE,
    bag_table,
    catalogue_embeddings,
    feature_tables,
    kjt_features,
    table_specs,
    tables_read_by,
)

HISTORY_ITEM_TABLE = "history_item_ids"
CANDIDATE_ITEM_TABLE = "candidate_item_ids"


@dataclass
class BagsConfig:
    share_item_table: bool = True  # one item table for the history bags and the candidate id; false: one per side


class TwoTower(nn.Module):
    def __init__(self, meta: Metadata, cfg: JobConfig, tables: list[EmbeddingBagConfig], device: torch.device):
        super().__init__()
        loader, model = cfg.loader, cfg.model
        self.tables = tables
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device("meta"))
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
        self.query_keys = QueryLayout.for_data(meta, loader.history_bags, loader.use_user_id).keys
        self.candidate_keys = candidate_keys([f.name for f in meta.item_features])
        self.query_mlp = mlp(sum(dims[k] for k in self.query_keys), model.hidden_dims, model.output_dim, device)
        self.candidate_mlp = mlp(sum(dims[k] for k in self.candidate_keys), model.hidden_dims, model.output_dim,
                                 device)

    def collections(self) -> list[nn.Module]:
        return [self.ebc]

    def towers(self, features: KeyedJaggedTensor, num_queries: int,
               candidate_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised query embeddings of rows [0, num_queries) and candidate embeddings of all rows. Given the
        rows' `candidate_ids`, the candidate MLP runs once per distinct item (its copies have the same
        features) and its output is spread back to every row."""
        pooled = self.ebc(features).to_dict()
        query = torch.cat([pooled[k][:num_queries] for k in self.query_keys], dim=1)
        candidate = torch.cat([pooled[k] for k in self.candidate_keys], dim=1)
        if candidate_ids is None:
            return F.normalize(self.query_mlp(query), dim=-1), F.normalize(self.candidate_mlp(candidate), dim=-1)
        _, first, inverse = first_copies(candidate_ids)
        # index_select, not [...]: its backward is an index_add, about 3x faster than indexing's on CPU
        distinct = F.normalize(self.candidate_mlp(candidate.index_select(0, first)), dim=-1)
        return F.normalize(self.query_mlp(query), dim=-1), distinct.index_select(0, inverse)

    def encode(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.towers(batch.sparse, batch.row_mask.shape[0], batch.candidate_ids)

    def item_embeddings(self, catalogue: Catalogue, device: torch.device) -> torch.Tensor:
        return catalogue_embeddings(lambda kjt: self.towers(kjt.to(device), 0)[1], catalogue, self.query_keys,
                                    self.candidate_keys)

    def query_embeddings(self, batch, device: torch.device) -> torch.Tensor:
        return self.towers(batch.sparse.to(device), batch.row_mask.shape[0])[0]


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


def query_side(model: PlainTowers) -> PlainTowers:
    """The query tower alone: only the tables (and features) the query reads, and the query MLP."""
    tables = tables_read_by(model.specs, model.query_keys)
    widths = [layer.out_features for layer in model.query_mlp if isinstance(layer, torch.nn.Linear)]
    tower = PlainTowers(tables, model.query_keys, [], widths[:-1], widths[-1])
    tower.load_state_dict({k: v for k, v in model.state_dict().items() if k in tower.state_dict()})
    return tower


class Bags(Tower):
    name = "bags"
    summary = "history-bag"
    Config = BagsConfig
    layout = POOLED

    def check(self, cfg: JobConfig) -> None:
        if not cfg.loader.history_bags:
            raise ConfigError("loader.history_bags is empty: the bags tower's query needs at least one history bag")

    def bag_tables(self, meta: Metadata, cfg: JobConfig) -> list[EmbeddingBagConfig]:
        """The item table (shared by the history bags and the candidate id, or one per side), then the feature
        tables."""
        history = [history_key(k) for k in cfg.loader.history_bags]
        dim, vocab = cfg.model.item_dim, meta.item_vocab
        if self.section(cfg).share_item_table:
            items = [bag_table(SHARED_ITEM_TABLE, dim, vocab, history + [ITEM_KEY])]
        else:
            items = [bag_table(HISTORY_ITEM_TABLE, dim, vocab, history),
                     bag_table(CANDIDATE_ITEM_TABLE, dim, vocab, [ITEM_KEY])]
        return items + feature_tables(meta, cfg.loader, cfg.model)

    def build(self, meta: Metadata, cfg: JobConfig, device: torch.device) -> TwoTower:
        return TwoTower(meta, cfg, self.bag_tables(meta, cfg), device)

    def plain(self, meta: Metadata, cfg: JobConfig, sparse: bool = False,
              device: torch.device | None = None) -> PlainTowers:
        """Both towers in plain PyTorch, under the training model's parameter names (export, benchmarks)."""
        layout = QueryLayout.for_data(meta, cfg.loader.history_bags, cfg.loader.use_user_id)
        return PlainTowers(table_specs(self.bag_tables(meta, cfg)), layout.keys,
                           candidate_keys([f.name for f in meta.item_features]), cfg.model.hidden_dims,
                           cfg.model.output_dim, sparse, device)

    def export(self, cfg: JobConfig, meta: Metadata, catalogue: Catalogue, load: Callable[[Any], None]) -> Exported:
        model = self.plain(meta, cfg)
        load(PlainWeights(model))
        model.eval()
        items = catalogue_embeddings(lambda kjt: model.candidate(kjt_features(kjt)), catalogue, [],
                                     model.candidate_keys).numpy()
        return Exported(query_side(model), items, {})

    def encode_queries(self, query_tower: nn.Module, batch) -> torch.Tensor:
        return query_tower.query(kjt_features(batch.sparse))


TOWER = Bags()
