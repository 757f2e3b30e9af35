"""An export directory (serving/format.py) loaded for serving, without TorchRec.

Loading needs torch, numpy, pyarrow and faiss only: the query tower is plain `nn.EmbeddingBag`s (bags) or
`serving.sequence.PlainSequenceTower` (transformer) loaded with `torch.load(weights_only=True)`, the items are
Parquet and the index is faiss. A query is built by `data.keys.QueryLayout`, the code the training loader
uses; the transformer's sequence is the history's last `max_length` ids, oldest first, as its loader cuts it.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from data.keys import QueryLayout
from data.schema import PAD_ID
from serving import index as ann
from serving.format import (
    EMBEDDING_COLUMN,
    ID_MAPS_DIR,
    INDEX_FILE,
    ITEM_EMBEDDINGS_FILE,
    MANIFEST_FILE,
    QUERY_TOWER_FILE,
    ExportError,
    Manifest,
    check_complete,
    read_verified,
)
from serving.plain import PlainTowers
from serving.sequence import PlainSequenceTower, SequenceShape
from storage import Location, location


def parquet(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


class ExportedModel:
    """An export (a local path or a URI), every file checked against its manifest's SHA-256 as it is read."""

    def __init__(self, directory: "str | Location"):
        self.directory = location(directory)
        commit = check_complete(self.directory)
        read = lambda name: read_verified(self.directory, name, commit)
        self.manifest = Manifest.from_json(read(MANIFEST_FILE).decode(), str(self.directory / MANIFEST_FILE))
        tower = self.manifest.query_tower
        self.sequence = tower.kind == "transformer"
        self.layout = QueryLayout.of(() if self.sequence else tower.history_bags, tower.use_user_id,
                                     [(f["name"], f["multi"]) for f in tower.features])
        if self.layout.keys != tower.query_keys:
            raise ExportError(f"{self.directory}: the manifest's query keys {tower.query_keys} are not those of its "
                              f"query layout {self.layout.keys}")
        if self.sequence:
            seq = tower.sequence
            self.tower = PlainSequenceTower(SequenceShape(**seq["shape"]), seq["item_vocab"], seq["max_length"],
                                            tower.tables, tower.query_keys, seq["candidate_dim"],
                                            tuple(tower.history_bags))
        else:
            self.tower = PlainTowers(tower.tables, tower.query_keys, [], tower.hidden_dims, tower.output_dim)
        self.tower.load_state_dict(torch.load(io.BytesIO(read(QUERY_TOWER_FILE)), weights_only=True))
        self.tower.eval()
        items = parquet(read(ITEM_EMBEDDINGS_FILE))
        self.item_ids = items.column("item").to_numpy()
        self.raw_ids = [str(r) for r in items.column("raw_id").to_pylist()]
        self.titles = items.column("title").to_pylist() if "title" in items.column_names else [None] * len(self.raw_ids)
        flat = pc.list_flatten(items.column(EMBEDDING_COLUMN)).to_numpy()
        self.embeddings = flat.astype(np.float32).reshape(len(self.raw_ids), self.manifest.dim)
        self.row_of_raw = {raw: row for row, raw in enumerate(self.raw_ids)}
        self.row_of_id = {int(i): row for row, i in enumerate(self.item_ids)}
        self.index = ann.from_bytes(read(INDEX_FILE), self.manifest.index["ef_search"],
                                    str(self.directory / INDEX_FILE))
        self.id_maps = {}
        for name in sorted(n for n in commit.files if n.startswith(f"{ID_MAPS_DIR}/") and n.endswith(".parquet")):
            table = parquet(read(name))
            raw = map(str, table.column("raw").to_pylist())
            self.id_maps[name[len(ID_MAPS_DIR) + 1:-len(".parquet")]] = dict(zip(raw, table.column("id").to_pylist()))

    @property
    def features(self) -> dict[str, bool]:
        """User and context features the query takes: name -> is a list."""
        return dict(self.layout.features)

    def query_input(self, history: list[int], features: dict[str, list[int]],
                    user: int = PAD_ID) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The tower input of one query (dense ids, history oldest first), as the training loader builds it."""
        arrays = self.layout.single(history, features, user, self.manifest.query_tower.max_history, PAD_ID)
        return {key: (torch.from_numpy(lengths), torch.from_numpy(values))
                for key, (lengths, values) in zip(self.layout.keys, arrays)}

    def sequence_input(self, history: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's (lengths, ids) of one query: the last `max_length` of the history's last
        `max_history` ids (the prepared data's cut, then the loader's), oldest first."""
        tower = self.manifest.query_tower
        ids = np.asarray(history[-tower.max_history:][-tower.sequence["max_length"]:], dtype=np.int64)
        return torch.tensor([len(ids)]), torch.from_numpy(ids)

    def encode(self, history: list[int], features: dict[str, list[int]], user: int = PAD_ID) -> np.ndarray:
        with torch.no_grad():
            inputs = self.query_input(history, features, user)
            if self.sequence:
                return self.tower.query(*self.sequence_input(history), inputs).numpy()[0]
            return self.tower.query(inputs).numpy()[0]
