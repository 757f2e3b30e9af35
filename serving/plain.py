"""The two towers rebuilt from plain `nn.EmbeddingBag`s, without TorchRec.

Two users: the exported query tower (serving loads it with `torch.load(weights_only=True)` and no
sharding code) and the training-step benchmark's plain-PyTorch baseline. Parameter names mirror
`TwoTower` (`tables.<table>.weight`, `query_mlp.*`, `candidate_mlp.*`), so weights move across by name.
The training model builds its MLPs with the same `mlp`, so both sides have the same layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

Features = dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (lengths, values) of a jagged feature


@dataclass(frozen=True)
class TableSpec:
    name: str
    num_embeddings: int
    dim: int
    features: tuple[str, ...]

    def as_dict(self) -> dict:
        return {**asdict(self), "features": list(self.features)}


def first_copies(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distinct ids ascending, the first position of each, each position's index into the distinct ids)."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)  # not len(): the pipeline's FX tracer runs this
    first = torch.full_like(distinct, ids.shape[0]).scatter_reduce_(0, inverse, rows, reduce="amin")
    return distinct, first, inverse


def mlp(in_dim: int, hidden: list[int], out_dim: int, device: torch.device | None = None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width, device=device), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim, device=device))
    return nn.Sequential(*layers)


class PlainTowers(nn.Module):
    """Mean-pooled bags -> concatenation in key order -> MLP -> L2 norm, like `TwoTower`.

    A side without keys has no MLP: the exported query tower keeps only the query side.
    """

    def __init__(self, tables: list[TableSpec], query_keys: list[str], candidate_keys: list[str],
                 hidden_dims: list[int], output_dim: int, sparse: bool = False, device: torch.device | None = None):
        super().__init__()
        self.specs = tables
        self.query_keys, self.candidate_keys = list(query_keys), list(candidate_keys)
        self.tables = nn.ModuleDict({t.name: nn.EmbeddingBag(t.num_embeddings, t.dim, mode="mean", sparse=sparse,
                                                             include_last_offset=True, device=device)
                                     for t in tables})
        self.table_of = {f: t.name for t in tables for f in t.features}
        dims = {f: t.dim for t in tables for f in t.features}
        self.query_mlp = mlp(sum(dims[k] for k in query_keys), hidden_dims, output_dim, device) if query_keys else None
        self.candidate_mlp = (mlp(sum(dims[k] for k in candidate_keys), hidden_dims, output_dim, device)
                              if candidate_keys else None)

    def pooled(self, key: str, lengths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        offsets = F.pad(torch.cumsum(lengths, 0), (1, 0))
        return self.tables[self.table_of[key]](values, offsets)

    def side(self, keys: list[str], head: nn.Module, features: Features, rows: int | None = None) -> torch.Tensor:
        parts = []
        for key in keys:
            lengths, values = features[key]
            if rows is not None:
                lengths, values = lengths[:rows], values[:int(lengths[:rows].sum())]
            parts.append(self.pooled(key, lengths, values))
        return F.normalize(head(torch.cat(parts, dim=1)), dim=-1)

    def query(self, features: Features, rows: int | None = None) -> torch.Tensor:
        return self.side(self.query_keys, self.query_mlp, features, rows)

    def candidate(self, features: Features) -> torch.Tensor:
        return self.side(self.candidate_keys, self.candidate_mlp, features)

    pools_history = True  # the history reaches it as pooled bags among the query keys (data.keys.QueryLayout)
    reads_times = False  # a query needs no event times

    @classmethod
    def from_manifest(cls, tower) -> "PlainTowers":
        """The exported query tower (serving.format.QueryTower)."""
        return cls(tower.tables, tower.query_keys, [], tower.hidden_dims, tower.output_dim)

    def encode(self, history: torch.Tensor, features: Features) -> torch.Tensor:
        """One query, its history already among the features as bags."""
        return self.query(features)

    def towers(self, features: Features, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as `TwoTower.towers`: queries of rows [0, num_queries), candidates of all rows."""
        return self.query(features, num_queries), self.candidate(features)
