"""Two-tower retrieval models: the bags tower over one EmbeddingBagCollection, and the transformer tower.

The query tower pools history bags (last-1, last-k, whole history: one shared item table), the
optional user id, user and context features; the candidate tower pools the item id and item
features. Both end in an MLP and L2 normalisation. All tables (sharding/tables.py) live in one EBC
declared on the meta device (DMP materialises it sharded) and are looked up with one call on
`batch.sparse`, so TrainPipelineSparseDist can prefetch and input-dist the whole lookup.

The transformer tower (`SequenceTwoTower`) looks the history up unpooled in an EmbeddingCollection whose
one item table also embeds the candidates, runs a causal pre-norm transformer over it, and fuses the
user and context features (still pooled by the EBC) into every position's query. Every module after the
two lookups sits in `SequenceHead`, a module without sharded children, which the pipeline's tracer keeps
as a leaf, so its data-dependent code is not traced.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, KeyedJaggedTensor

from config import LoaderConfig, ModelConfig
from data.batch import SequenceBatch, SequenceEvalBatch, TrainBatch, make_kjt
from data.catalogue import Catalogue
from data.keys import ITEM_KEY, SEQUENCE_KEY, QueryLayout, candidate_keys
from data.schema import Metadata
from serving.plain import TableSpec, first_copies, mlp
from serving.sequence import SequenceHead
from sharding.tables import sequence_table_configs, table_configs
from trainer.evaluate import catalogue_embeddings


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


class SequenceTwoTower(nn.Module):
    """Transformer query tower: an EmbeddingCollection (history and candidates share its item table), the
    EBC for user, context and item features (absent when the data has none), and `SequenceHead`."""

    def __init__(self, meta: Metadata, loader: LoaderConfig, cfg: ModelConfig, device: torch.device):
        super().__init__()
        self.sequence_tables = sequence_table_configs(meta, cfg)
        self.tables = table_configs(meta, loader, cfg)
        self.ec = EmbeddingCollection(tables=self.sequence_tables, device=torch.device("meta"))
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device("meta")) if self.tables else None
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
        self.query_keys = QueryLayout.for_data(meta, (), loader.use_user_id).keys
        self.candidate_keys = candidate_keys([f.name for f in meta.item_features])[1:]
        self.max_length = loader.max_sequence_length
        self.head = SequenceHead(cfg, loader.max_sequence_length, sum(dims[k] for k in self.query_keys),
                                 sum(dims[k] for k in self.candidate_keys), device, tuple(loader.history_bags))

    def encode(self, batch: SequenceBatch | SequenceEvalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries at the batch's positions (rows [0, P) of `sparse`), candidates (rows [P, P + C))."""
        looked_up = self.ec(batch.sequence)
        history, items = looked_up[SEQUENCE_KEY], looked_up[ITEM_KEY]
        num_queries = batch.positions.shape[0]
        query_features, item_features = [], []
        if self.ebc is not None:
            pooled = self.ebc(batch.sparse).to_dict()
            query_features = [pooled[k][:num_queries] for k in self.query_keys]
            item_features = [pooled[k][num_queries:] for k in self.candidate_keys]
        # The history key's lengths span the KJT's stride (sequence rows, then the candidates' empty rows):
        # only the sequence rows go through the causal stack.
        lengths = history.lengths()[:batch.row_mask.shape[0]]
        # Training batches carry the candidates' ids (the head runs its candidate MLP once per distinct item);
        # evaluation batches have no candidates.
        return self.head(history.values(), lengths, batch.positions, query_features, items.values(), item_features,
                         getattr(batch, "candidate_ids", None))

    def item_embeddings(self, catalogue: Catalogue, device: torch.device, chunk: int = 8192) -> torch.Tensor:
        """(num_items + 1, dim) candidate embeddings of the whole catalogue, in chunks."""
        parts = []
        with torch.no_grad():
            for ids in catalogue.chunks(chunk):
                n = len(ids)
                empty = (np.zeros(n, dtype=np.int64), np.zeros(0, dtype=np.int64))
                sequence = make_kjt([SEQUENCE_KEY, ITEM_KEY], [empty, (np.ones(n, dtype=np.int64), ids)])
                sparse = make_kjt(self.query_keys + self.candidate_keys, [empty] * len(self.query_keys)
                                  + catalogue.candidate_arrays(ids)[1:])
                batch = SequenceBatch(sparse=sparse, sequence=sequence, positions=torch.zeros(0, dtype=torch.long),
                                      own_column=torch.zeros(0, dtype=torch.long), candidate_ids=torch.from_numpy(ids),
                                      num_positives=torch.zeros(1, dtype=torch.long),
                                      row_mask=torch.zeros(0, dtype=torch.bool))
                parts.append(self.encode(batch.to(device))[1])
        return torch.cat(parts)

    def query_embeddings(self, batch: SequenceEvalBatch, device: torch.device) -> torch.Tensor:
        return self.encode(batch.to(device))[0]


class RetrievalModel(nn.Module):
    """Towers plus loss: forward(batch) -> (loss, stats), the contract TrainPipelineSparseDist expects."""

    def __init__(self, towers: TwoTower | SequenceTwoTower, loss_fn):
        super().__init__()
        self.towers = towers
        self.loss_fn = loss_fn

    def forward(self, batch: TrainBatch | SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        query, candidates = self.towers.encode(batch)
        loss = self.loss_fn(query, candidates, batch)
        return loss, {"loss": loss.detach(), "examples": query.new_tensor(batch.num_examples)}
