"""The sequence towers' modules after the lookups (transformer and HSTU), in plain PyTorch: the training model
(trainer/assembly.py) runs them behind TorchRec's EmbeddingCollection, and the exported query tower
(`PlainSequenceTower`) behind a plain `nn.Embedding`, so serving needs neither TorchRec nor fbgemm_gpu and scores
exactly as training did.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serving.layers import BLOCK_KINDS, Dropout, gap_buckets, make_block, time_gap_buckets
from serving.plain import Features, TableSpec, first_copies, mlp


@dataclass(frozen=True)
class SequenceShape:
    """The `model.*` fields `SequenceHead` reads (the training side passes its ModelConfig), as the export
    manifest records them."""

    item_dim: int
    blocks: int
    heads: int
    dropout: float
    hidden_dims: list[int]
    output_dim: int
    input_norm: bool = False  # LayerNorm on item + position embeddings before the input dropout
    candidate: str = "mlp"  # "mlp": candidate MLP over the item embedding and features; "tied": the item embedding
    block: str = "softmax"  # serving.layers.BLOCK_KINDS: the transformer's block, or "silu" for HSTU's
    time_buckets: int = 0  # > 0: HSTU's units add a time-gap bias, so every query needs its events' times

    def __post_init__(self) -> None:
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"SequenceShape.block must be one of {BLOCK_KINDS}, got '{self.block}'")
        if self.time_buckets and self.block != "silu":
            raise ValueError(f"SequenceShape.time_buckets needs the 'silu' block, got '{self.block}'")

    def as_dict(self) -> dict:
        return asdict(self)


def causal_bags(x: torch.Tensor, windows: list[int], first: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per window k, the mean of the last min(k, t + 1) items at every step t of the padded rows x (B, n, d)
    (k = 0: every item so far): the bag tower's last-k bags for every position at once, from cumulative
    sums. Steps past a row's length are never read. With `first` (B, n), the column where the row at each
    column starts (rows packed several to a lane), a bag never reaches before it."""
    b, n, d = x.shape
    sums = F.pad(x.cumsum(dim=1), (0, 0, 1, 0))  # sums[:, t + 1] = x[:, :t + 1].sum(1)
    end = torch.arange(1, n + 1, device=x.device)
    first = torch.zeros(b, n, dtype=torch.long, device=x.device) if first is None else first
    out = []
    for k in windows:
        start = first if k == 0 else torch.maximum(end - k, first)
        before = sums.gather(1, start[..., None].expand(b, n, d))
        out.append((sums[:, 1:] - before) / (end - start)[..., None].to(x.dtype))
    return out


@dataclass
class Grid:
    """Where a batch's jagged rows sit in the stack's (lanes, width) input: one row a lane, left-aligned, or
    (given their lanes, data.ragged.pack_lanes) several rows a lane, so the stack computes less padding.
    Places are flat, lane * width + column."""

    lanes: int
    width: int
    rows: torch.Tensor  # (T,) each item's row
    steps: torch.Tensor  # (T,) each item's step within its row
    origins: torch.Tensor  # (B,) the place of each row's step 0
    packed: bool

    @classmethod
    def of(cls, lengths: torch.Tensor, lanes: torch.Tensor | None = None) -> "Grid":
        """`lengths` (B,) of the rows; `lanes` (B, 2): each row's lane and first column, or None (or empty)."""
        width = max(int(lengths.max()), 1)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        steps = torch.arange(len(rows), device=lengths.device) - torch.repeat_interleave(starts, lengths)
        packed = lanes is not None and lanes.numel() > 0
        if packed:
            origins, count = lanes[:, 0] * width + lanes[:, 1], int(lanes[:, 0].max()) + 1
        else:
            origins, count = torch.arange(len(lengths), device=lengths.device) * width, len(lengths)
        return cls(count, width, rows, steps, origins, packed)

    @property
    def slots(self) -> torch.Tensor:
        """(T,) each item's place."""
        return self.origins[self.rows] + self.steps

    def place(self, values: torch.Tensor, fill: float | int = 0) -> torch.Tensor:
        """(lanes, width, *) from per-item `values` (T, *), `fill` where no item is."""
        out = values.new_full((self.lanes * self.width, *values.shape[1:]), fill)
        return out.index_copy(0, self.slots, values).view(self.lanes, self.width, *values.shape[1:])

    def positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Row positions (row * width + step, as the loader gives them) as places."""
        return self.origins[positions // self.width] + positions % self.width

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lanes, width, width) True where column i may read column j (the same row, j <= i), and (lanes, width)
        the column where the row at each column starts (a padding column's own)."""
        row = self.place(self.rows, fill=-1)
        columns = torch.arange(self.width, device=row.device)
        first = torch.where(row >= 0, self.place(self.slots % self.width - self.steps), columns)
        return (row[:, :, None] == row[:, None, :]) & (columns[:, None] >= columns[None, :]), first


class SequenceHead(nn.Module):
    """Everything after the lookups: positions, the causal stack, the history bags (`loader.history_bags`,
    mean-pooled causally from the same lookup), feature fusion, both MLPs. `cfg` is a SequenceShape or anything
    with its fields (the training side passes its ModelConfig)."""

    def __init__(self, cfg: SequenceShape, max_length: int, query_dim: int, candidate_dim: int,
                 device: torch.device | None = None, bags: tuple[int, ...] = ()):
        super().__init__()
        self.bags = list(bags)
        self.scale = math.sqrt(cfg.item_dim)
        self.position = nn.Embedding(max_length, cfg.item_dim, device=device)
        self.input_dropout = Dropout(cfg.dropout)
        self.time_buckets = cfg.time_buckets
        self.blocks = nn.ModuleList(make_block(cfg.block, cfg.item_dim, cfg.heads, cfg.dropout, max_length,
                                               cfg.time_buckets, device) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.item_dim, device=device)
        self.input_norm = nn.LayerNorm(cfg.item_dim, device=device) if cfg.input_norm else nn.Identity()
        self.query_mlp = mlp(cfg.item_dim * (1 + len(self.bags)) + query_dim, cfg.hidden_dims, cfg.output_dim,
                             device)
        self.candidate_dim = candidate_dim
        self.tied = cfg.candidate == "tied"
        if self.tied:
            # The candidate is its item embedding, the table the history reads (SASRec's tied output). Item
            # features, where the data has them, are added through a projection that starts at zero.
            self.candidate_mlp = None
            self.feature_projection = nn.Linear(candidate_dim, cfg.item_dim, device=device) if candidate_dim else None
            if self.feature_projection is not None:
                nn.init.zeros_(self.feature_projection.weight)
                nn.init.zeros_(self.feature_projection.bias)
        else:
            self.candidate_mlp = mlp(cfg.item_dim + candidate_dim, cfg.hidden_dims, cfg.output_dim, device)
        nn.init.normal_(self.position.weight, std=0.02)

    def gaps(self, times: torch.Tensor | None, grid: Grid) -> torch.Tensor | None:
        """The time-gap buckets of a batch's `times` (data.batch.no_times: (rows, width + 1)) on the stack's grid,
        if the units read them."""
        if not self.time_buckets:
            return None
        rows, width = len(grid.origins), grid.width
        if times is None or tuple(times.shape) != (rows, width + 1):
            found = "none" if times is None or times.numel() == 0 else f"shape {tuple(times.shape)}"
            raise ValueError(f"this model reads event times (HSTU's time-gap bias): each of the {rows} rows needs its "
                             f"items' times and the query's, shape ({rows}, {width + 1}); got {found}")
        if not grid.packed:
            return time_gap_buckets(times, self.time_buckets)
        return gap_buckets(grid.place(times[grid.rows, grid.steps + 1]), grid.place(times[grid.rows, grid.steps]),
                           self.time_buckets)

    def encode(self, history: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
               times: torch.Tensor | None = None, lanes: torch.Tensor | None = None) -> torch.Tensor:
        """The causal stack's output at `positions` (row * width + step, width = the longest row), followed by
        the history bags there. `times`: see `gaps`; `lanes`: see `Grid.of` (packed rows give the same outputs
        as padded ones, on fewer positions)."""
        d = history.shape[1]
        if len(lengths) == 0:  # no sequence rows (the catalogue's candidates only)
            return history.new_zeros(0, d * (1 + len(self.bags)))
        # A batch without positions (a rank's all-padding last batch) still runs the stack, so that every rank
        # builds the same autograd graph and DDP's gradient all-reduce meets on all of them.
        grid = Grid.of(lengths.long(), lanes)
        items = grid.place(history)
        mask = first = None
        if grid.packed:
            mask, first = grid.masks()
            positions = grid.positions(positions)
            steps = self.position(grid.place(grid.steps))
        else:
            steps = self.position.weight[:grid.width]
        x = self.input_dropout(self.input_norm(items * self.scale + steps))
        gaps = self.gaps(times, grid)
        for block in self.blocks:
            x = block(x, gaps, mask)
        parts = [self.norm(x)] + causal_bags(items, self.bags, first)
        # One gather of the joined parts: its backward is one index_add, where a gather per part costs an
        # accumulating index_put each (about 3x the time on the CPU).
        return torch.cat(parts, dim=2).view(-1, d * len(parts)).index_select(0, positions)

    def query(self, history: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
              query_features: list[torch.Tensor], times: torch.Tensor | None = None,
              lanes: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised queries at `positions` of the sequence rows (`lengths`)."""
        encoded = self.encode(history, lengths, positions, times, lanes)
        return F.normalize(self.query_mlp(torch.cat([encoded] + query_features, dim=1)), dim=-1)

    def candidate(self, items: torch.Tensor, item_features: list[torch.Tensor]) -> torch.Tensor:
        if self.candidate_mlp is not None:
            return F.normalize(self.candidate_mlp(torch.cat([items] + item_features, dim=1)), dim=-1)
        if self.feature_projection is not None:
            items = items + self.feature_projection(torch.cat(item_features, dim=1))
        return F.normalize(items, dim=-1)

    def forward(self, history: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
                query_features: list[torch.Tensor], items: torch.Tensor, item_features: list[torch.Tensor],
                candidate_ids: torch.Tensor | None = None, times: torch.Tensor | None = None,
                lanes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised queries at `positions` of the sequence rows (`lengths`) and candidates. Given the candidate
        rows' ids, the candidate MLP runs once per distinct item and its output is spread back to every row."""
        query = self.query(history, lengths, positions, query_features, times, lanes)
        if candidate_ids is None:
            return query, self.candidate(items, item_features)
        _, first, inverse = first_copies(candidate_ids)
        distinct = self.candidate(items.index_select(0, first), [f.index_select(0, first) for f in item_features])
        return query, distinct.index_select(0, inverse)


class PlainSequenceTower(nn.Module):
    """The exported transformer query tower: the item table as an `nn.Embedding`, the user and context feature
    tables as mean `nn.EmbeddingBag`s, and the training `SequenceHead` (its candidate MLP included, so the
    state dict is the training model's, name for name). Parameter names: `items.weight`,
    `tables.<table>.weight`, `head.*`. `sparse`: sparse gradients for the item table (the training-step
    benchmark's SparseAdam baseline)."""

    def __init__(self, shape: SequenceShape, item_vocab: int, max_length: int, tables: list[TableSpec],
                 query_keys: list[str], candidate_dim: int, bags: tuple[int, ...], sparse: bool = False):
        super().__init__()
        self.specs, self.query_keys, self.max_length = tables, list(query_keys), max_length
        self.items = nn.Embedding(item_vocab, shape.item_dim, sparse=sparse)
        self.tables = nn.ModuleDict({t.name: nn.EmbeddingBag(t.num_embeddings, t.dim, mode="mean",
                                                             include_last_offset=True) for t in tables})
        self.table_of = {f: t.name for t in tables for f in t.features}
        dims = {f: t.dim for t in tables for f in t.features}
        self.head = SequenceHead(shape, max_length, sum(dims[k] for k in query_keys), candidate_dim, bags=bags)

    pools_history = False  # the history reaches it unpooled, not among the query keys

    @classmethod
    def from_manifest(cls, tower) -> "PlainSequenceTower":
        """The exported query tower (serving.format.QueryTower, its `sequence` fields)."""
        seq = tower.sequence
        return cls(SequenceShape(**seq["shape"]), seq["item_vocab"], seq["max_length"], tower.tables,
                   tower.query_keys, seq["candidate_dim"], tuple(tower.history_bags))

    @property
    def reads_times(self) -> bool:
        """Whether a query needs its events' times (HSTU's time-gap bias)."""
        return bool(self.head.time_buckets)

    def encode(self, history: torch.Tensor, features: Features, times: torch.Tensor | None = None) -> torch.Tensor:
        """One query: its history's last `max_length` ids, oldest first, as the evaluation loader cuts it; with
        `reads_times`, `times` holds the history's times and then the query's (one more than the history)."""
        ids = history[-self.max_length:]
        if times is not None:
            if len(times) != len(history) + 1:
                raise ValueError(f"a query's times are its history's and then its own: {len(history) + 1} "
                                 f"values, got {len(times)}")
            # An empty history still has a step (width 1): its times are the query's, then padding, as in evaluation.
            times = F.pad(times[-(len(ids) + 1):], (0, int(len(ids) == 0))).reshape(1, -1)
        return self.query(torch.tensor([len(ids)]), ids, features, times)

    def pooled(self, key: str, lengths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
        return self.tables[self.table_of[key]](values, offsets)

    def query(self, lengths: torch.Tensor, values: torch.Tensor, features: Features,
              times: torch.Tensor | None = None) -> torch.Tensor:
        """Queries of sequence rows (`lengths`, item ids `values`, oldest first, at most the max length) with
        their features (and `times`, data.batch.no_times): the encoding at each row's last position, as the
        evaluation loader places it."""
        width = max(int(lengths.max()), 1) if len(lengths) else 1
        positions = torch.arange(len(lengths)) * width + (lengths - 1).clamp(min=0)
        parts = [self.pooled(k, *features[k]) for k in self.query_keys]
        return self.head.query(self.items(values), lengths, positions, parts, times)

    def candidate(self, features: Features, item_key: str, feature_keys: list[str]) -> torch.Tensor:
        """Candidate embeddings of rows holding one item id each under `item_key` (export builds the catalogue's
        with the item feature tables in `tables`; the exported query tower has none)."""
        ids = features[item_key][1]
        return self.head.candidate(self.items(ids), [self.pooled(k, *features[k]) for k in feature_keys])
