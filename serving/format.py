"""The export format: what `trainer/export/artifact.py` writes and `serving/model.py` reads.

    <export>/export.json      the manifest below: architecture, query semantics, provenance, index
    <export>/query_tower.pt   the plain query tower's state dict (torch.load(weights_only=True)), of the serving
                              module the manifest's query_tower.model names (serving/model.py:SERVING_MODULES)
    <export>/items.parquet    item, raw_id, title, freq, embedding (L2-normalised, fixed_size_list<float32>)
    <export>/items.faiss      ANN index over the embeddings, inner product (ids = item)
    <export>/id_maps/         raw value -> id of each query feature (and of users, with a user table)
    <export>/_manifest.json   every file's size and SHA-256, written last (storage/commit.py): an export without
                              it is incomplete, and one whose files do not match it is damaged; neither is served
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from serving.plain import TableSpec
from storage import Location, StorageError, location, require_committed
from storage import Manifest as CommitManifest

FORMAT_VERSION = 2  # 2: query_tower.model names the serving module
MANIFEST_FILE = "export.json"
QUERY_TOWER_FILE = "query_tower.pt"
ITEM_EMBEDDINGS_FILE = "items.parquet"  # not the prepared catalogue (data.schema.ITEMS_FILE), though named alike
INDEX_FILE = "items.faiss"
ID_MAPS_DIR = "id_maps"
USER_MAP = "user"  # the id map of raw user ids, in ID_MAPS_DIR
REQUIRED_FILES = (MANIFEST_FILE, QUERY_TOWER_FILE, ITEM_EMBEDDINGS_FILE, INDEX_FILE)
EMBEDDING_COLUMN = "embedding"
RECALL_K = 10  # the index's measured recall@K against exact search


KIND = "export"


class ExportError(ValueError):
    """An export directory that is incomplete, damaged or of another format version."""


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
    kind: str  # model.query_tower (the tower that was trained), for people: serving reads `model`
    model: str  # the serving module's class (serving/model.py:SERVING_MODULES), rebuilt by its from_manifest
    # what that module needs beyond the fields above (the sequence module: shape, item_vocab, max_length,
    # candidate_dim; history_bags are then its causal bags)
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

    def to_json(self) -> str:
        data = asdict(self)
        data["query_tower"]["tables"] = [t.as_dict() for t in self.query_tower.tables]
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}: not JSON ({err.msg} at line {err.lineno}); export again") from None
        if data.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{path}: export format {data.get('format_version')}, but this version reads "
                              f"{FORMAT_VERSION}; export the checkpoint again with `python -m trainer.export`")
        tower = data.pop("query_tower")
        tower["tables"] = [TableSpec(t["name"], t["num_embeddings"], t["dim"], tuple(t["features"]))
                           for t in tower["tables"]]
        return cls(query_tower=QueryTower(**tower), **data)


def check_complete(directory: "str | Location") -> CommitManifest:
    """The commit manifest of a complete export (every required file listed, with its recorded size)."""
    directory = location(directory)
    try:
        commit = require_committed(directory, KIND, "write one with `python -m trainer.export`")
    except StorageError as err:  # a CommitError says what is missing, with the hint
        raise ExportError(str(err)) from None
    for name in REQUIRED_FILES:
        if name not in commit.files:
            raise ExportError(f"{directory / name}: missing, so {directory} is not a complete export; write one with "
                              f"`python -m trainer.export`")
    return commit


def read_verified(directory: Location, name: str, commit: CommitManifest) -> bytes:
    """A file of the export, checked against the SHA-256 its manifest recorded (a damaged file is named, never
    parsed)."""
    data = (directory / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != commit.files[name]["sha256"]:
        raise ExportError(f"{directory / name}: does not match the SHA-256 recorded when it was exported (corrupted "
                          f"or overwritten); export again")
    return data
