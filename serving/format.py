"""The export format: what `trainer/export.py` writes and `serving/model.py` reads.

    <export>/export.json      the manifest below: architecture, query semantics, provenance, index
    <export>/query_tower.pt   the plain query tower's state dict (torch.load(weights_only=True)): PlainTowers'
                              (bags) or PlainSequenceTower's (transformer), as the manifest's query_tower.kind
    <export>/items.parquet    item, raw_id, title, freq, embedding (L2-normalised, fixed_size_list<float32>)
    <export>/items.faiss      ANN index over the embeddings, inner product (ids = item)
    <export>/id_maps/         raw value -> id of each query feature (and of users, with a user table)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serving.plain import TableSpec

FORMAT_VERSION = 1
MANIFEST_FILE = "export.json"
QUERY_TOWER_FILE = "query_tower.pt"
ITEM_EMBEDDINGS_FILE = "items.parquet"  # not the prepared catalogue (data.schema.ITEMS_FILE), though named alike
INDEX_FILE = "items.faiss"
ID_MAPS_DIR = "id_maps"
USER_MAP = "user"  # the id map of raw user ids, in ID_MAPS_DIR
REQUIRED_FILES = (MANIFEST_FILE, QUERY_TOWER_FILE, ITEM_EMBEDDINGS_FILE, INDEX_FILE)
EMBEDDING_COLUMN = "embedding"
RECALL_K = 10  # the index's measured recall@K against exact search


class ExportError(ValueError):
    """An export directory that is incomplete or of another format version."""


@dataclass
class QueryTower:
    """How the query tower is built and fed: the same bags and features the training loader builds."""

    tables: list[TableSpec]
    query_keys: list[str]
    hidden_dims: list[int]
    output_dim: int
    history_bags: list[int]
    max_history: int
    use_user_id: bool
    features: list[dict]  # {"name": user or context feature, "multi": is a list}
    kind: str = "bags"  # model.query_tower: "bags", or "transformer" (serving/sequence.py)
    # transformer: shape (serving.sequence.SequenceShape), item_vocab, max_length, candidate_dim; history_bags
    # are then its causal bags
    sequence: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """export.json, typed."""

    dim: int
    temperature: float
    filter_seen: bool  # recommend leaves the history out of the results when true
    query_tower: QueryTower
    items: dict
    index: dict
    source: dict
    metric: str = "inner product on L2-normalised vectors (the training score times the temperature)"
    format_version: int = FORMAT_VERSION

    def save(self, directory: Path) -> None:
        data = asdict(self)
        data["query_tower"]["tables"] = [t.as_dict() for t in self.query_tower.tables]
        (Path(directory) / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_FILE
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{path}: export format {data.get('format_version')}, but this version reads "
                              f"{FORMAT_VERSION}; export the checkpoint again with `python -m trainer.export`")
        tower = data.pop("query_tower")
        tower["tables"] = [TableSpec(t["name"], t["num_embeddings"], t["dim"], tuple(t["features"]))
                           for t in tower["tables"]]
        return cls(query_tower=QueryTower(**tower), **data)


def check_complete(directory: Path) -> None:
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise ExportError(f"{directory / name}: missing, so {directory} is not a complete export; write one with "
                              f"`python -m trainer.export`")
