"""An export directory (serving/format.py) loaded for serving, without TorchRec.

Loading needs torch, numpy, pyarrow and faiss only: the query tower is the serving module the manifest names
(`SERVING_MODULES`: plain `nn.EmbeddingBag`s, or `serving.sequence.PlainSequenceTower`) loaded with
`torch.load(weights_only=True)`, the items are Parquet and the index is faiss. A query is built by
`data.keys.QueryLayout`, the code the training loader uses; a sequence module cuts the history as its
loader does.
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
from serving.sequence import PlainSequenceTower
from storage import Location, location

# The query towers serving can run, by class name (the manifest's query_tower.model): each has
# `from_manifest(tower)`, `pools_history`, `reads_times` and `encode(history, features[, times])`.
SERVING_MODULES = {module.__name__: module for module in (PlainTowers, PlainSequenceTower)}


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
        if tower.model not in SERVING_MODULES:
            raise ExportError(f"{self.directory / MANIFEST_FILE}: query_tower.model '{tower.model}' is not a serving "
                              f"module of this version ({', '.join(SERVING_MODULES)})")
        module = SERVING_MODULES[tower.model]
        self.layout = QueryLayout.of(tower.history_bags if module.pools_history else (), tower.use_user_id,
                                     [(f["name"], f["multi"]) for f in tower.features])
        if self.layout.keys != tower.query_keys:
            raise ExportError(f"{self.directory}: the manifest's query keys {tower.query_keys} are not those of its "
                              f"query layout {self.layout.keys}")
        self.tower = module.from_manifest(tower)
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

    @property
    def reads_times(self) -> bool:
        """Whether a query needs its events' times (an HSTU tower trained with its time-gap bias)."""
        return self.tower.reads_times

    def encode(self, history: list[int], features: dict[str, list[int]], user: int = PAD_ID,
               times: list[int] | None = None) -> np.ndarray:
        """One query's embedding; with `reads_times`, `times` are the history's times in seconds and then the
        query's (len(history) + 1 values)."""
        if self.reads_times and (times is None or len(times) != len(history) + 1):
            raise ValueError(f"this model reads event times: a query needs one time per history item and then its "
                             f"own ({len(history) + 1} values), got {'none' if times is None else len(times)}")
        with torch.no_grad():
            inputs = self.query_input(history, features, user)
            # the prepared data's cut (its max history), then the module's own
            cut = self.manifest.query_tower.max_history
            ids = torch.tensor(history[-cut:], dtype=torch.int64)
            if not self.reads_times:
                return self.tower.encode(ids, inputs).numpy()[0]
            return self.tower.encode(ids, inputs, torch.tensor(times[-(len(ids) + 1):], dtype=torch.int64)).numpy()[0]
