"""The prepared layout's contract: file names, column names, reserved ids and metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 3  # 2: duplicate, filter and repeat counts; 3: the training sequences file
# Dense id 0 of every vocabulary is reserved: padding, and the id unknown raw values map to.
PAD_ID = 0

METADATA_FILE = "metadata.json"
TRAIN_DIR = "train"
VALID_FILE = "valid.parquet"
TEST_FILE = "test.parquet"
SEQUENCES_FILE = "train_sequences.parquet"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
ID_MAPS_DIR = "id_maps"

# Columns of training rows (one row = one (query, positive) example).
USER = "user"
HISTORY = "history"
TARGET = "target"
TIMESTAMP = "ts"
# Columns of training sequence rows (one row = one user's events up to their last training target, oldest
# first; the user's user features; each context feature as a list aligned with the events).
SEQUENCE_ITEMS = "seq_items"
SEQUENCE_TARGETS = "seq_targets"  # per event: its item where the event is a training target, else 0
# Extra columns of validation/test rows (one row = one user query).
TARGETS = "targets"
SEEN = "seen"
# Catalogue columns.
ITEM = "item"
RAW_ID = "raw_id"
TITLE = "title"
FREQ = "freq"


@dataclass
class FeatureSpec:
    """A categorical feature: its vocabulary size (pad id included) and whether it is a list."""

    name: str
    vocab_size: int
    multi: bool
    mean_length: float = 1.0


@dataclass
class Metadata:
    """What the trainer needs to size tables and read files; written as metadata.json."""

    schema_version: int
    source: dict
    split: dict
    filters: dict
    max_history: int
    num_users: int
    num_items: int
    counts: dict
    item_features: list[FeatureSpec] = field(default_factory=list)
    user_features: list[FeatureSpec] = field(default_factory=list)
    context_features: list[FeatureSpec] = field(default_factory=list)
    mean_history_length: float = 0.0
    mean_sequence_length: float = 0.0  # events per row of the sequences file
    train_files: list[str] = field(default_factory=list)
    # Per eval split: queries, targets, repeat_targets (consumed earlier by the same user), repeat_share,
    # queries_all_repeat (every target is a repeat: a seen-filtering evaluator cannot rank any).
    repeats: dict = field(default_factory=dict)

    @property
    def item_vocab(self) -> int:
        return self.num_items + 1

    @property
    def user_vocab(self) -> int:
        return self.num_users + 1

    def save(self, directory: Path) -> None:
        (Path(directory) / METADATA_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Metadata":
        from data.errors import DataError

        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise DataError(path, None, "a prepared dataset's metadata.json (run `python -m data.prepare`)",
                            "no such file")
        raw = json.loads(path.read_text())
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise DataError(path, "schema_version", f"{SCHEMA_VERSION} (prepare the data again with this version of "
                            f"`python -m data.prepare`)", str(raw.get("schema_version")))
        for group in ("item_features", "user_features", "context_features"):
            raw[group] = [FeatureSpec(**spec) for spec in raw.get(group, [])]
        return cls(**raw)
