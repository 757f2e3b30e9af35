"""Part readers: one part of a raw source -> validated batches of the canonical event schema (raw.py).

They run wherever the engine reads: in the preparing process (the embedded engine) or in Spark's executors,
one task per part, so they take only a picklable `Part` and reach storage through its URI.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from data.errors import DataError
from data.sources.columns import (
    Where,
    id_column,
    integer_tokens,
    numeric_column,
    star_ratings,
    time_column,
)
from data.sources.files import csv_batches, is_parquet, parquet_file, require_columns, stream_lines
from data.sources.raw import Part, event_schema, src_column
from storage import location

BATCH_ROWS = 65_536
TYPES = {"int64": pa.int64(), "string": pa.string()}


def events_batch(schema: pa.Schema, users, items, ts, ratings, src) -> pa.RecordBatch:
    rating = ratings if ratings is not None else pa.nulls(len(ts), pa.float64())
    return pa.RecordBatch.from_arrays([users, items, ts, rating, src], schema=schema)


def table_part(part: Part) -> Iterator[pa.RecordBatch]:
    """A generic CSV/Parquet part (`interactions`, and MovieLens ratings.csv)."""
    o = part.opts
    where = location(part.uri)
    schema = event_schema(TYPES[o["user_type"]], TYPES[o["item_type"]])
    columns = [o["user"], o["item"], o["time"]] + ([o["rating"]] if o.get("rating") else [])
    if is_parquet(where.name):
        file = parquet_file(where)
        require_columns(file.schema_arrow.names, columns, where)
        first_line, batches = None, file.iter_batches(BATCH_ROWS, row_groups=list(o["row_groups"]), columns=columns)
    else:
        first_line = 2
        batches = csv_batches(where, o["encoding"], string_columns=[o["user"], o["item"]], include=None)
    at = Where(str(where), first_line, o.get("first_row", 0))
    rows = 0
    try:
        for batch in batches:
            if rows == 0 and first_line is not None:
                require_columns(batch.schema.names, columns, where)
            here = at.shifted(rows)
            users = id_column(batch.column(o["user"]), here, o["user"], schema.field("user").type, o["integer_ids"])
            items = id_column(batch.column(o["item"]), here, o["item"], schema.field("item").type, o["integer_ids"])
            ts = time_column(batch.column(o["time"]), here, o["time"])
            ratings = None
            if o.get("rating"):
                ratings = (star_ratings if o["stars"] else numeric_column)(batch.column(o["rating"]), here, o["rating"])
            yield events_batch(schema, users, items, ts, ratings, src_column(part.index, rows, batch.num_rows))
            rows += batch.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(where, None, "a valid Parquet file", str(err).splitlines()[0]) from None


def delimited_part(part: Part) -> Iterator[pa.RecordBatch]:
    """MovieLens `user sep item sep rating sep timestamp` lines (u.data, ratings.dat): all fields strict."""
    o = part.opts
    where = location(part.uri)
    schema = event_schema(pa.int64(), pa.int64())
    names = ["user", "item", "rating", "ts"]
    rows = 0
    for batch in csv_batches(where, o["encoding"], column_names=names, delimiter=o["sep"], string_columns=names,
                             quoting=False):
        here = Where(str(where), 1, rows)
        yield events_batch(schema, integer_tokens(batch.column("user"), here, "user"),
                           integer_tokens(batch.column("item"), here, "item"),
                           integer_tokens(batch.column("ts"), here, "ts", "integer unix timestamps"),
                           star_ratings(batch.column("rating"), here, "rating"),
                           src_column(part.index, rows, batch.num_rows))
        rows += batch.num_rows


def canonical_tokens(tokens: list[str], lines: np.ndarray, where: str, column: str, string_ids: bool) -> pa.Array:
    """Sequence-file tokens as ids; integers are checked and canonical ('007' is item 7)."""
    array = pa.array(tokens, pa.string())
    if string_ids:
        return array
    try:
        return integer_tokens(array, Where(where, 1), column, "non-negative integer ids (or pass --string-ids)")
    except DataError as err:
        bad = next(i for i, t in enumerate(tokens) if not (t.isdigit() and len(t) <= 18))
        raise DataError(where, column, "non-negative integer ids (or pass --string-ids)",
                        err.found.rsplit(" on ", 1)[0] + f" on line {lines[bad]}") from None


def sequences_part(part: Part) -> Iterator[pa.RecordBatch]:
    """`user item item ...` lines, oldest item first; positions stand in for time. A user on two lines is an
    error (the order of their events would be undefined)."""
    o = part.opts
    where = location(part.uri)
    kind = pa.string() if o["string_ids"] else pa.int64()
    schema = event_schema(kind, kind)
    first_line: dict = {}
    pending: list[tuple[int, list[str]]] = []
    tokens_in_batch = 0
    emitted = 0
    counted = [0]  # events of this part so far

    def flush() -> pa.RecordBatch:
        numbers = np.array([n for n, _ in pending])
        lengths = np.array([len(t) - 1 for _, t in pending])
        users = canonical_tokens([t[0] for _, t in pending], numbers, str(where), "user", o["string_ids"])
        for number, user in zip(numbers.tolist(), users.to_pylist()):
            if user in first_line:
                raise DataError(where, "user", "one line per user (the order of a user's events would be "
                                               "undefined)", f"user '{user}' on lines {first_line[user]} and {number}")
            first_line[user] = number
        items = canonical_tokens([i for _, t in pending for i in t[1:]], np.repeat(numbers, lengths), str(where),
                                 "items", o["string_ids"])
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = np.arange(int(lengths.sum()), dtype=np.int64) - starts
        batch = events_batch(schema, pa.array(np.repeat(users.to_numpy(zero_copy_only=False), lengths), kind), items,
                             pa.array(positions), None, src_column(part.index, counted[0], len(positions)))
        counted[0] += len(positions)
        return batch

    for number, tokens in stream_lines(where):
        if len(tokens) < 2:
            raise DataError(where, "items", "at least one item after the user id", f"none on line {number}")
        pending.append((number, tokens))
        tokens_in_batch += len(tokens)
        if tokens_in_batch >= BATCH_ROWS:
            yield flush()
            emitted += 1
            pending, tokens_in_batch = [], 0
    if pending:
        yield flush()
    elif not emitted:
        raise DataError(where, None, "at least one 'user item ...' line", "no lines")


READERS = {"table": table_part, "delimited": delimited_part, "sequences": sequences_part}


def read_part(part: Part) -> Iterator[pa.RecordBatch]:
    """The canonical event batches of one part."""
    return READERS[part.reader](part)
