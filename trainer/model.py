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

import math

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
from serving.plain import TableSpec, mlp
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

    def towers(self, features: KeyedJaggedTensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised query embeddings of rows [0, num_queries) and candidate embeddings of all rows."""
        pooled = self.ebc(features).to_dict()
        query = torch.cat([pooled[k][:num_queries] for k in self.query_keys], dim=1)
        candidate = torch.cat([pooled[k] for k in self.candidate_keys], dim=1)
        return (F.normalize(self.query_mlp(query), dim=-1), F.normalize(self.candidate_mlp(candidate), dim=-1))

    def encode(self, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.towers(batch.sparse, batch.row_mask.shape[0])

    def item_embeddings(self, catalogue: Catalogue, device: torch.device) -> torch.Tensor:
        return catalogue_embeddings(lambda kjt: self.towers(kjt.to(device), 0)[1], catalogue, self.query_keys,
                                    self.candidate_keys)

    def query_embeddings(self, batch, device: torch.device) -> torch.Tensor:
        return self.towers(batch.sparse.to(device), batch.row_mask.shape[0])[0]


class Dropout(nn.Module):
    """Inverted dropout drawn as uniform >= p: the distribution of nn.Dropout, about 2.5x faster on CPU, where
    torch's bernoulli_ is the slowest op of the transformer step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * ((torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p)))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: Dropout) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v, with dropout on the attention weights. torch's
    scaled_dot_product_attention does this, except where it would draw the dropout with bernoulli_ on the
    CPU (about 40 ms per call on ML-1M batches): there the weights are formed here and `dropout` applied."""
    if not (dropout.training and dropout.p > 0 and q.device.type == "cpu"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=dropout.p if dropout.training else 0.0)
    n = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return dropout(scores.masked_fill(future, float("-inf")).softmax(dim=-1)) @ v


class CausalBlock(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + feed-forward(norm(x)); causal attention
    (a position sees itself and the positions before it)."""

    def __init__(self, dim: int, heads: int, dropout: float, device: torch.device):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attention_norm = nn.LayerNorm(dim, device=device)
        self.qkv = nn.Linear(dim, 3 * dim, device=device)
        self.out = nn.Linear(dim, dim, device=device)
        self.ff_norm = nn.LayerNorm(dim, device=device)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim, device=device), nn.GELU(), Dropout(dropout),
                                nn.Linear(4 * dim, dim, device=device))
        self.drop = Dropout(dropout)
        self.attention_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = causal_attention(q, k, v, self.attention_dropout)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.ff_norm(x)))


def padded(values: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, width, d) from jagged rows (values (sum(lengths), d)), left-aligned, zeros after each row."""
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    step = torch.arange(len(values), device=values.device) - torch.repeat_interleave(starts, lengths)
    out = values.new_zeros(len(lengths) * width, values.shape[1])
    return out.index_copy(0, rows * width + step, values).view(len(lengths), width, values.shape[1])


def causal_bags(x: torch.Tensor, windows: list[int]) -> list[torch.Tensor]:
    """Per window k, the mean of the last min(k, t + 1) items at every step t of the padded rows x (B, n, d)
    (k = 0: every item so far): the bag tower's last-k bags for every position at once, from cumulative
    sums. Steps past a row's length are never read."""
    n = x.shape[1]
    sums = F.pad(x.cumsum(dim=1), (0, 0, 1, 0))  # sums[:, t + 1] = x[:, :t + 1].sum(1)
    steps = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)[None, :, None]
    out = []
    for k in windows:
        start = torch.zeros(n, dtype=torch.long, device=x.device) if k == 0 else \
            (torch.arange(n, device=x.device) + 1 - k).clamp(min=0)
        out.append((sums[:, 1:] - sums[:, start]) / (steps if k == 0 else steps.clamp(max=k)))
    return out


class SequenceHead(nn.Module):
    """Everything after the lookups: positions, the causal stack, the history bags (`loader.history_bags`,
    mean-pooled causally from the same lookup), feature fusion, both MLPs."""

    def __init__(self, cfg: ModelConfig, max_length: int, query_dim: int, candidate_dim: int, device: torch.device,
                 bags: tuple[int, ...] = ()):
        super().__init__()
        self.bags = list(bags)
        self.scale = math.sqrt(cfg.item_dim)
        self.position = nn.Embedding(max_length, cfg.item_dim, device=device)
        self.input_dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CausalBlock(cfg.item_dim, cfg.heads, cfg.dropout, device)
                                    for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.item_dim, device=device)
        self.query_mlp = mlp(cfg.item_dim * (1 + len(self.bags)) + query_dim, cfg.hidden_dims, cfg.output_dim,
                             device)
        self.candidate_mlp = mlp(cfg.item_dim + candidate_dim, cfg.hidden_dims, cfg.output_dim, device)
        nn.init.normal_(self.position.weight, std=0.02)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The causal stack's output at `positions` (row * width + step, width = the longest row), followed by
        the history bags there."""
        d = history.shape[1]
        if len(lengths) == 0:  # no sequence rows (the catalogue's candidates only)
            return history.new_zeros(0, d * (1 + len(self.bags)))
        # A batch without positions (a rank's all-padding last batch) still runs the stack, so that every rank
        # builds the same autograd graph and DDP's gradient all-reduce meets on all of them.
        lengths = lengths.long()
        width = max(int(lengths.max()), 1)
        items = padded(history, lengths, width)
        x = self.input_dropout(items * self.scale + self.position.weight[:width])
        for block in self.blocks:
            x = block(x)
        parts = [self.norm(x)] + causal_bags(items, self.bags)
        return torch.cat([p.reshape(-1, d)[positions] for p in parts], dim=1)

    def forward(self, history: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
                query_features: list[torch.Tensor], items: torch.Tensor,
                item_features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised queries at `positions` of the sequence rows (`lengths`) and candidates."""
        encoded = self.encode(history, lengths, positions)
        query = self.query_mlp(torch.cat([encoded] + query_features, dim=1))
        candidate = self.candidate_mlp(torch.cat([items] + item_features, dim=1))
        return F.normalize(query, dim=-1), F.normalize(candidate, dim=-1)


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
        return self.head(history.values(), lengths, batch.positions, query_features, items.values(), item_features)

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
