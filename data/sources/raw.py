"""What every raw source gives prepare: its events as parts to stream, and its side tables.

Events are read part by part (`Part`: a file, or some row groups of a Parquet file) into batches of one
canonical schema, so that the same readers feed the embedded engine (in this process) and Spark (one task
per part, on the executors):

    user, item   int64 when the source's ids are integers, else string (the raw id as text)
    ts           int64 (seconds for clock times; positions for sequence files)
    rating       float64, null when the source has no ratings
    src          int64, the event's place in the source: part << 40 | row within the part. It orders ties
                 (events of one user at the same time keep their order in the files) and decides which copy
                 of a duplicate survives.

Side tables (item and user features, titles) are catalogue-sized and read whole, into long form: one row
per (key, feature, value), all text, so multi-valued features need no per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PART_BITS = 40  # rows per part below 2**40; parts below 2**23
MAX_EXAMPLES = 5  # ids quoted in a warning
FEATURE_SCHEMA = pa.schema([("key", pa.string()), ("feature", pa.string()), ("value", pa.string())])
TITLE_SCHEMA = pa.schema([("item", pa.string()), ("title", pa.string())])


def event_schema(user_type: pa.DataType, item_type: pa.DataType) -> pa.Schema:
    return pa.schema([("user", user_type), ("item", item_type), ("ts", pa.int64()), ("rating", pa.float64()),
                      ("src", pa.int64())])


@dataclass(frozen=True)
class Part:
    """One unit of reading: `reader` names the function in data/sources/parts.py that reads it."""

    index: int
    uri: str
    reader: str
    options: tuple = ()  # (name, value) pairs; a tuple so that a Part is hashable and pickles small

    @property
    def opts(self) -> dict:
        return dict(self.options)


@dataclass
class Coverage:
    """A side table that should describe every id of the events: prepare warns about the ones it lacks."""

    kind: str  # "item" or "user"
    uri: str
    keys: pa.Array | None  # the ids it describes (text); None when the file is missing


@dataclass
class RawSource:
    """A raw source ready to prepare: event parts (or, for generated data, the events themselves) and side
    tables in long form. `origin` names file:column for messages; `params` go into metadata.json."""

    kind: str
    parts: list[Part]
    user_type: pa.DataType
    item_type: pa.DataType
    has_time: bool
    has_rating: bool
    origin: dict[str, str]
    files: list[str]  # every source file, for the checksum
    item_features: pa.Table = field(default_factory=lambda: FEATURE_SCHEMA.empty_table())
    user_features: pa.Table = field(default_factory=lambda: FEATURE_SCHEMA.empty_table())
    titles: pa.Table = field(default_factory=lambda: TITLE_SCHEMA.empty_table())
    multi_valued: set[str] = field(default_factory=set)
    coverage: list[Coverage] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    events: pa.Table | None = None  # generated sources hold their events; files are read from `parts`

    @property
    def schema(self) -> pa.Schema:
        return event_schema(self.user_type, self.item_type)


def as_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    return array if pa.types.is_string(array.type) else pc.cast(array, pa.string())


def long_form(keys: pa.Array, feature: str, values: pa.Array, sep: str | None = None) -> pa.Table:
    """(key, feature, value) rows; `sep` splits multi-valued text such as 'Action|Comedy'; empty and null
    values are dropped."""
    keys, values = as_text(keys), as_text(values)
    if sep is not None:
        parts = pc.split_pattern(values, sep)
        keys = pc.take(keys, pc.list_parent_indices(parts))
        values = pc.list_flatten(parts)
    keep = pc.and_(pc.is_valid(values), pc.not_equal(pc.fill_null(values, ""), ""))
    keys, values = pc.filter(keys, keep), pc.filter(values, keep)
    return pa.table({"key": keys, "feature": pa.array([feature] * len(keys), pa.string()), "value": values},
                    schema=FEATURE_SCHEMA)


def list_long_form(keys: pa.Array, feature: str, lists: pa.Array) -> pa.Table:
    """A list column as (key, feature, value) rows."""
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    flat = pc.list_flatten(lists)
    return long_form(pc.take(as_text(keys), pc.list_parent_indices(lists)), feature, flat)


def concat_features(parts: list[pa.Table]) -> pa.Table:
    return pa.concat_tables([p.cast(FEATURE_SCHEMA) for p in parts]) if parts else FEATURE_SCHEMA.empty_table()


def titles_table(items: pa.Array, titles: pa.Array) -> pa.Table:
    return pa.table({"item": as_text(items), "title": as_text(titles)}, schema=TITLE_SCHEMA)


def coverage_warning(coverage: Coverage, missing: list[str], count: int) -> str | None:
    """The warning for event ids a side table lacks (`missing`: a few of them, `count`: how many)."""
    if coverage.keys is None:
        return f"{coverage.uri} not found: {coverage.kind}s get no side features or titles"
    if not count:
        return None
    examples = ", ".join(missing[:MAX_EXAMPLES])
    return (f"{coverage.uri}: {count} {coverage.kind} ids of the events are not listed (e.g. {examples}); they get "
            f"no side features{' or titles' if coverage.kind == 'item' else ''}")


def src_column(part: int, first_row: int, rows: int) -> pa.Array:
    return pa.array((np.int64(part) << PART_BITS) + first_row + np.arange(rows, dtype=np.int64), pa.int64())
