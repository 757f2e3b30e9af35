"""The transformer tower: a causal pre-norm transformer over the history, trained at every position.

The history is looked up unpooled in an EmbeddingCollection whose one item table also embeds the candidates;
the user and context features (and item features) are still pooled by an EBC. Every module after the two
lookups sits in `serving.sequence.SequenceHead`, a module without sharded children, which the pipeline's
tracer keeps as a leaf (its data-dependent code is not traced), and which the exported query tower
(`serving.sequence.PlainSequenceTower`) runs behind a plain `nn.Embedding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig

from config import ConfigError, JobConfig
from data.batch import SequenceBatch, SequenceEvalBatch, make_kjt
from data.catalogue import Catalogue
from data.keys import ITEM_KEY, SEQUENCE_KEY, QueryLayout, candidate_keys
from data.loader import SEQUENCE
from data.schema import Metadata
from serving.sequence import PlainSequenceTower, SequenceHead, SequenceShape
from towers.base import Exported, Tower
from towers.shared import (
    SHARED_ITEM_TABLE,
    catalogue_embeddings,
    feature_tables,
    kjt_features,
    table_specs,
    tables_read_by,
)

CANDIDATES = ("mlp", "tied")


@dataclass
class TransformerConfig:
    blocks: int = 2  # pre-norm self-attention blocks
    heads: int = 1  # attention heads (model.item_dim must divide by it)
    dropout: float = 0.2  # on the input embeddings, attention and feed-forward outputs
    input_norm: bool = False  # LayerNorm on item + position embeddings, before the input dropout
    # "mlp": candidates through their own MLP (item id and features); "tied": a candidate is its row of the item
    # table the history reads (its features added through a zero-initialised projection); needs
    # model.output_dim == model.item_dim.
    candidate: str = "mlp"

    def __post_init__(self) -> None:
        if self.candidate not in CANDIDATES:
            raise ConfigError(f"model.tower.candidate must be one of {CANDIDATES}, got '{self.candidate}'")
        if not (self.blocks >= 1 and self.heads >= 1):
            raise ConfigError("model.tower.blocks and model.tower.heads must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.tower.dropout must be in [0, 1), got {self.dropout}")


def shape(cfg: JobConfig, block: str, time_buckets: int = 0) -> SequenceShape:
    """The head's shape from the job's model section and its tower's (a TransformerConfig or a subclass)."""
    m, t = cfg.model, cfg.model.tower
    return SequenceShape(m.item_dim, t.blocks, t.heads, t.dropout, list(m.hidden_dims), m.output_dim, t.input_norm,
                         t.candidate, block, time_buckets)


class SequenceTwoTower(nn.Module):
    """The EmbeddingCollection (history and candidates share its item table), the EBC for user, context and
    item features (absent when the data has none), and `SequenceHead`."""

    def __init__(self, meta: Metadata, cfg: JobConfig, head: SequenceShape, sequence_tables: list[EmbeddingConfig],
                 tables: list[EmbeddingBagConfig], device: torch.device):
        super().__init__()
        loader = cfg.loader
        self.sequence_tables, self.tables = sequence_tables, tables
        self.ec = EmbeddingCollection(tables=self.sequence_tables, device=torch.device("meta"))
        self.ebc = EmbeddingBagCollection(tables=self.tables, device=torch.device("meta")) if self.tables else None
        dims = {f: t.embedding_dim for t in self.tables for f in t.feature_names}
        self.query_keys = QueryLayout.for_data(meta, (), loader.use_user_id).keys
        self.candidate_keys = candidate_keys([f.name for f in meta.item_features])[1:]
        self.max_length = loader.max_sequence_length
        self.head = SequenceHead(head, loader.max_sequence_length, sum(dims[k] for k in self.query_keys),
                                 sum(dims[k] for k in self.candidate_keys), device, tuple(loader.history_bags))

    def collections(self) -> list[nn.Module]:
        return ([self.ebc] if self.ebc is not None else []) + [self.ec]

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
                         getattr(batch, "candidate_ids", None), batch.times, getattr(batch, "lanes", None))

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


class Transformer(Tower):
    name = "transformer"
    summary = "causal-transformer"
    Config = TransformerConfig
    layout = SEQUENCE
    block = "softmax"  # serving.layers.BLOCK_KINDS: the causal stack's block

    def time_buckets(self, meta: Metadata, cfg: JobConfig) -> int:
        """Time-gap buckets of the stack's bias (SequenceShape.time_buckets): none for softmax attention."""
        return 0

    def shape(self, meta: Metadata, cfg: JobConfig) -> SequenceShape:
        return shape(cfg, self.block, self.time_buckets(meta, cfg))

    def check(self, cfg: JobConfig) -> None:
        section = self.section(cfg)
        if cfg.model.item_dim % section.heads:
            raise ConfigError(f"model.item_dim ({cfg.model.item_dim}) must be divisible by model.tower.heads "
                              f"({section.heads})")
        if section.candidate == "tied" and cfg.model.output_dim != cfg.model.item_dim:
            raise ConfigError(f"model.tower.candidate=tied scores queries against the item table: model.output_dim "
                              f"({cfg.model.output_dim}) must equal model.item_dim ({cfg.model.item_dim})")

    def bag_tables(self, meta: Metadata, cfg: JobConfig) -> list[EmbeddingBagConfig]:
        """The feature tables only: the items are in the EmbeddingCollection."""
        return feature_tables(meta, cfg.loader, cfg.model)

    def sequence_tables(self, meta: Metadata, cfg: JobConfig) -> list[EmbeddingConfig]:
        """The one item table, read unpooled by the history (SEQUENCE_KEY) and by the candidates (ITEM_KEY)."""
        return [EmbeddingConfig(name=SHARED_ITEM_TABLE, embedding_dim=cfg.model.item_dim,
                                num_embeddings=meta.item_vocab, feature_names=[SEQUENCE_KEY, ITEM_KEY])]

    def build(self, meta: Metadata, cfg: JobConfig, device: torch.device) -> SequenceTwoTower:
        return SequenceTwoTower(meta, cfg, self.shape(meta, cfg), self.sequence_tables(meta, cfg),
                                self.bag_tables(meta, cfg), device)

    def plain(self, meta: Metadata, cfg: JobConfig, query_only: bool = False,
              sparse: bool = False) -> PlainSequenceTower:
        """Both towers in plain PyTorch: every EBC table (item features embed the catalogue), or with
        `query_only` just the tables the query reads (the exported tower)."""
        self.section(cfg)
        layout = QueryLayout.for_data(meta, (), cfg.loader.use_user_id)
        tables = table_specs(self.bag_tables(meta, cfg))
        dims = {f: t.dim for t in tables for f in t.features}
        features = candidate_keys([f.name for f in meta.item_features])[1:]
        if query_only:
            tables = tables_read_by(tables, layout.keys)
        return PlainSequenceTower(self.shape(meta, cfg), meta.item_vocab, cfg.loader.max_sequence_length, tables,
                                  layout.keys, sum(dims[k] for k in features), tuple(cfg.loader.history_bags), sparse)

    def export(self, cfg: JobConfig, meta: Metadata, catalogue: Catalogue, load: Callable[[Any], None]) -> Exported:
        model = self.plain(meta, cfg)
        load(PlainSequenceWeights(model))
        model.eval()
        features = candidate_keys([f.name for f in meta.item_features])
        items = catalogue_embeddings(lambda kjt: model.candidate(kjt_features(kjt), ITEM_KEY, features[1:]),
                                     catalogue, [], features).numpy()
        tower = self.plain(meta, cfg, query_only=True)
        tower.load_state_dict({k: v for k, v in model.state_dict().items() if k in tower.state_dict()})
        tower.eval()
        candidate_dim = model.head.candidate_dim
        return Exported(tower, items, {"shape": self.shape(meta, cfg).as_dict(), "item_vocab": meta.item_vocab,
                                       "max_length": cfg.loader.max_sequence_length,
                                       "candidate_dim": candidate_dim})

    def encode_queries(self, query_tower: nn.Module, batch) -> torch.Tensor:
        history = batch.sequence[SEQUENCE_KEY]
        times = batch.times if query_tower.reads_times else None
        return query_tower.query(history.lengths().long(), history.values(), kjt_features(batch.sparse), times)


TOWER = Transformer()
