"""What plan.py asks of an engine, and the Parquet writer both engines share.

An engine runs the plan's SQL: it loads the raw events (streamed through the part readers), materialises
intermediate tables (spilling to disk, or cached on executors), returns small results to the plan, and
writes result rows into the prepared layout. Both engines write with `PartWriter`, so their files have the
same schema, row groups and bytes for the same rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import pyarrow as pa

from data.prepare.builders import Shape
from data.prepare.dialect import Dialect
from data.sources.raw import RawSource
from storage import Location
from storage.commit import Staging

ROW_GROUP_ROWS = 16_384
ROWS_PER_FILE = 262_144
INTERNAL = "_"  # columns whose name starts with this order and bucket rows; they are not written


@dataclass(frozen=True)
class Output:
    """Where a query's rows go: one file, or `files` parts `name/part-NNNNN.parquet` chosen by the query's
    `_bucket` column. `order` (total) orders the rows of each file. `by_chunk`: the rows come chunk by chunk of
    users (builders.py), and chunk c's rows are bucket c's."""

    name: str
    order: tuple[str, ...]
    files: int = 1
    by_chunk: bool = False
    count: str = ""  # a list column whose values the writers count (for mean lengths, without another query)

    @property
    def parts(self) -> bool:
        return self.files > 1 or not self.name.endswith(".parquet")

    def file(self, bucket: int) -> str:
        return f"{self.name}/part-{bucket:05d}.parquet" if self.parts else self.name


@dataclass
class Written:
    """What an engine wrote for one output: its files (in order), rows, and values of `Output.count`."""

    names: list[str]
    rows: int = 0
    values: int = 0

    def add(self, name: str, rows: int, values: int) -> None:
        self.names.append(name)
        self.rows += rows
        self.values += values


def canonical_type(kind: pa.DataType) -> pa.DataType:
    """One Arrow type per column whichever engine produced it: int64, float64, string, list<int64>."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(canonical_type(kind.value_type))
    if pa.types.is_integer(kind):
        return pa.int64()
    if pa.types.is_floating(kind):
        return pa.float64()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.string()
    return kind


def output_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, canonical_type(f.type)) for f in schema if not f.name.startswith(INTERNAL)])


class PartWriter:
    """One Parquet file of the prepared layout, written through storage with exactly ROW_GROUP_ROWS rows per row
    group whatever batch sizes arrive; size and SHA-256 are known when it is closed."""

    def __init__(self, target: Location, name: str, count: str = ""):
        self.target, self.name, self.count = target, name, count
        self.sink, self.schema = None, None
        self.pending: list[pa.RecordBatch] = []
        self.buffered = self.rows = self.values = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if self.schema is None:
            self.schema = output_schema(batch.schema)
            self.sink = self.target.parquet_writer(self.schema)
        batch = pa.RecordBatch.from_arrays([batch.column(n).cast(f.type) for n, f in
                                            zip(self.schema.names, self.schema)], schema=self.schema)
        if self.count:
            offsets = batch.column(self.count).offsets
            self.values += offsets[-1].as_py() - offsets[0].as_py()
        self.pending.append(batch)
        self.buffered += batch.num_rows
        while self.buffered >= ROW_GROUP_ROWS:
            self.flush(ROW_GROUP_ROWS)

    def flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self.pending, schema=self.schema)
        self.sink.write(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self.pending, self.buffered = rest.to_batches(), rest.num_rows
        self.rows += rows

    def close(self, schema: pa.Schema | None = None) -> tuple[str, int, str, int, int]:
        """(name, size, SHA-256, rows, values counted). A writer that saw no rows writes an empty file of
        `schema`."""
        if self.schema is None:
            self.schema = output_schema(schema)
            self.sink = self.target.parquet_writer(self.schema)
        if self.buffered:
            self.flush(self.buffered)
        size, sha256 = self.sink.close()
        return self.name, size, sha256, self.rows, self.values


class Engine(ABC):
    """Runs the plan's SQL (see the module docstring)."""

    dialect: Dialect

    @abstractmethod
    def load_events(self, source: RawSource) -> None:
        """The source's events as table `raw_events` (the canonical event schema)."""

    @abstractmethod
    def load_arrow(self, name: str, table: pa.Table) -> None:
        """A small table from this process (side tables, id lists) under `name`."""

    @abstractmethod
    def create(self, name: str, sql: str, order: tuple[str, ...] = ()) -> None:
        """Materialises the query as table `name` (replacing one of that name), stored in `order` where the engine
        gains from it (the embedded engine skips what a chunk's filter excludes by its zone maps)."""

    @abstractmethod
    def drop(self, *names: str) -> None:
        """Frees tables the plan no longer needs."""

    @abstractmethod
    def rows(self, sql: str) -> list[tuple]:
        """A small result."""

    @abstractmethod
    def write(self, sql: str, output: Output, staging: Staging) -> Written:
        """Writes the query's rows into the staging location (see `Output`) and records each file in `staging`."""

    @abstractmethod
    def write_built(self, kind: str, shape: Shape, events_sql: str, side_sql: str, output: Output, staging: Staging,
                    groups: int) -> Written:
        """Writes the rows builders.build(kind) makes from each of `groups` groups of users (builders.user_ranges):
        the group's events (`events_sql`) and its users' rows (`side_sql`, with a `user` column). For `by_chunk`
        outputs the groups are the shape's chunks."""

    @abstractmethod
    def checksums(self, uris: list[str]) -> list[dict]:
        """{"path", "sha256"} of each source file, computed where the engine reads."""

    @abstractmethod
    def close(self) -> None:
        """Releases what the engine holds (temporary files, sessions it started)."""
