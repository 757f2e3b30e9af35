"""The prepared layout's contract: file names, column names, reserved ids and metadata.

    metadata.json            this module's `Metadata`
    train/part-*.parquet     one row per (query, positive); shuffled over the parts and within each
    train_sequences/part-*   one row per user with a training target (the transformer's rows), users in order
    valid/part-*, test/...   one row per query, users in order
    items.parquet            the catalogue; users.parquet; id_maps/<name>.parquet (raw -> id)
    _manifest.json           every file with its size and SHA-256, written last (storage/commit.py): a dataset
                             without it is incomplete and is never read
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from data.errors import DataError
from storage import MANIFEST_FILE, Location, StorageError, location, require_committed

SCHEMA_VERSION = 4  # 2: duplicate, filter and repeat counts; 3: the training sequences; 4: every split in parts
KIND = "prepared dataset"
# Dense id 0 of every vocabulary is reserved: padding, and the id unknown raw values map to.
PAD_ID = 0

METADATA_FILE = "metadata.json"
TRAIN_DIR = "train"
SEQUENCES_DIR = "train_sequences"
VALID_DIR = "valid"
TEST_DIR = "test"
SPLIT_DIRS = {"train": TRAIN_DIR, "train_sequences": SEQUENCES_DIR, "valid": VALID_DIR, "test": TEST_DIR}
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
SEQUENCE_TIMES = "seq_ts"  # per event: its time in seconds (only where the source has event times)
# Extra columns of validation/test rows (one row = one user query).
TARGETS = "targets"
SEEN = "seen"
HISTORY_TIMES = "history_ts"  # per history item: its time; with TIMESTAMP, the query's (where the source has times)
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
    # The Parquet parts of each split (SPLIT_DIRS's keys), relative to the dataset, in reading order.
    files: dict[str, list[str]] = field(default_factory=dict)
    # Per eval split: queries, targets, repeat_targets (consumed earlier by the same user), repeat_share,
    # queries_all_repeat (every target is a repeat: a seen-filtering evaluator cannot rank any).
    repeats: dict = field(default_factory=dict)
    # The sequences carry SEQUENCE_TIMES and the evaluation rows HISTORY_TIMES and TIMESTAMP (HSTU's time-gap
    # bias reads them); False for a source without a clock, and for data prepared before these columns.
    event_times: bool = False

    @property
    def item_vocab(self) -> int:
        return self.num_items + 1

    @property
    def user_vocab(self) -> int:
        return self.num_users + 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, directory: "str | Location") -> "Metadata":
        """The metadata of a complete (committed) prepared dataset; a one-line error naming what is missing."""
        directory = location(directory)
        path = directory / METADATA_FILE
        expected = f"a prepared dataset: {METADATA_FILE} and {MANIFEST_FILE}, written by `python -m data.prepare`"
        try:
            require_committed(directory, KIND, "")
            text = path.read_text()
        except StorageError as err:  # a CommitError's problem says what is missing
            raise DataError(err.uri, None, expected, err.problem) from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(path, None, "JSON metadata written by `python -m data.prepare`",
                            f"{err.msg} at line {err.lineno}, column {err.colno}") from None
        if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
            found = raw.get("schema_version") if isinstance(raw, dict) else type(raw).__name__
            raise DataError(path, "schema_version", f"{SCHEMA_VERSION} (prepare the data again with this version of "
                                                    f"`python -m data.prepare`)", str(found))
        try:
            for group in ("item_features", "user_features", "context_features"):
                raw[group] = [FeatureSpec(**spec) for spec in raw.get(group, [])]
            return cls(**raw)
        except TypeError as err:
            raise DataError(path, None, "the metadata fields of this version", str(err)) from None
