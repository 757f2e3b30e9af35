"""Reads an export directory (see trainer/export.py) for serving, without TorchRec.

Loading needs torch, numpy, pyarrow and faiss only: the query tower is plain `nn.EmbeddingBag`s
loaded with `torch.load(weights_only=True)`, the items are Parquet and the index is faiss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data.schema import PAD_ID
from trainer import index as ann
from trainer.plain import Features, PlainTowers, TableSpec

EXPORT_FILE = "export.json"
QUERY_TOWER_FILE = "query_tower.pt"
ITEMS_FILE = "items.parquet"
INDEX_FILE = "items.faiss"
ID_MAPS_DIR = "id_maps"
USER_MAP = "user"


@dataclass
class QuerySpec:
    """How a query is turned into tower input: the same bags the training loader builds."""

    history_bags: list[int]
    max_history: int
    use_user_id: bool
    features: dict[str, bool]  # user and context feature -> is a list feature


def query_features(spec: QuerySpec, history: list[int], features: dict[str, list[int]],
                   user: int = PAD_ID) -> Features:
    """One query's tower input. History is oldest first; as in training only its last `max_history`
    items count, bag k pools the last k (0 = all). A feature not given is the padding id."""
    history = history[-spec.max_history:]

    def bag(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([len(ids)]), torch.tensor(ids, dtype=torch.int64)

    out = {}
    for k in spec.history_bags:
        out["hist_all" if k == 0 else f"hist_last{k}"] = bag(history if k == 0 else history[-k:])
    if spec.use_user_id:
        out["user_id"] = bag([user])
    for name, multi in spec.features.items():
        out[name] = bag(features.get(name, [] if multi else [PAD_ID]))
    return out


class ExportedModel:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        for name in (EXPORT_FILE, QUERY_TOWER_FILE, ITEMS_FILE, INDEX_FILE):
            if not (self.directory / name).is_file():
                raise FileNotFoundError(f"{self.directory / name}: missing, so {self.directory} is not a complete "
                                        f"export; write one with `python -m trainer.export`")
        path = self.directory / EXPORT_FILE
        self.info = json.loads(path.read_text())
        tower = self.info["query_tower"]
        self.spec = QuerySpec(tower["history_bags"], tower["max_history"], tower["use_user_id"],
                              {f["name"]: f["multi"] for f in tower["features"]})
        tables = [TableSpec(t["name"], t["num_embeddings"], t["dim"], tuple(t["features"])) for t in tower["tables"]]
        self.tower = PlainTowers(tables, tower["query_keys"], [], tower["hidden_dims"], tower["output_dim"])
        self.tower.load_state_dict(torch.load(self.directory / QUERY_TOWER_FILE, weights_only=True))
        self.tower.eval()
        items = pq.read_table(self.directory / ITEMS_FILE)
        self.item_ids = items.column("item").to_numpy()
        self.raw_ids = [str(r) for r in items.column("raw_id").to_pylist()]
        self.titles = items.column("title").to_pylist() if "title" in items.column_names else [None] * len(self.raw_ids)
        flat = pc.list_flatten(items.column("embedding")).to_numpy()
        self.embeddings = flat.astype(np.float32).reshape(len(self.raw_ids), self.info["dim"])
        self.row_of_raw = {raw: row for row, raw in enumerate(self.raw_ids)}
        self.row_of_id = {int(i): row for row, i in enumerate(self.item_ids)}
        self.index = ann.load(self.directory / INDEX_FILE, self.info["index"]["ef_search"])
        self.id_maps = {}
        maps = self.directory / ID_MAPS_DIR
        for file in sorted(maps.glob("*.parquet")) if maps.is_dir() else []:
            table = pq.read_table(file)
            raw = map(str, table.column("raw").to_pylist())
            self.id_maps[file.stem] = dict(zip(raw, table.column("id").to_pylist()))

    def encode(self, history: list[int], features: dict[str, list[int]], user: int = PAD_ID) -> np.ndarray:
        with torch.no_grad():
            return self.tower.query(query_features(self.spec, history, features, user)).numpy()[0]
