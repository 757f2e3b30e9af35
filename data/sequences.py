"""Sequence rows cut into training chunks, vectorised (no per-row Python).

A row of n events has n - 1 inputs: position t reads events [0, t] and predicts event t + 1. Chunks hold at
most `max_len` inputs and are aligned on the newest event: chunk 0 ends with input n - 2, chunk 1 ends where
chunk 0 starts, and so on, so each target is predicted exactly once and a short remainder is the oldest chunk.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.ragged import gather_ragged, list_array, list_offsets_values


def chunk_counts(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Chunks of each row of `lengths` events."""
    inputs = np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0)
    return (inputs + max_len - 1) // max_len


def chunk_bounds(offsets: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, start, length) of every chunk of the CSR rows `offsets`, newest chunk of a row first; `start` is
    the flat index of the chunk's first input, whose target is at start + 1."""
    lengths = np.diff(offsets)
    counts = chunk_counts(lengths, max_len)
    row = np.repeat(np.arange(len(lengths)), counts)
    k = np.arange(len(row)) - np.repeat(np.cumsum(counts) - counts, counts)
    stop = offsets[row] + lengths[row] - 1 - k * max_len
    start = np.maximum(offsets[row], stop - max_len)
    return row, start, stop - start


def chunk_table(table: pa.Table, items: str, aligned: list[str], max_len: int, spans: tuple[str, ...] = ()) -> pa.Table:
    """The chunk rows of a sequence table: `items` becomes each chunk's inputs, each column of `aligned` (lists
    aligned with the events: the targets, per-event context) its values at the inputs' targets, each column of
    `spans` (aligned too: the event times) its values at the inputs and then the last input's target (one more
    than the inputs); every other column is repeated per chunk."""
    offsets, values = list_offsets_values(table.column(items))
    row, start, length = chunk_bounds(offsets, max_len)
    columns = {}
    for name in table.column_names:
        if name == items:
            columns[name] = list_array(length, gather_ragged(values, start, length))
        elif name in aligned or name in spans:
            column_offsets, column_values = list_offsets_values(table.column(name))
            if not np.array_equal(column_offsets, offsets):
                raise ValueError(f"column {name} is not aligned with {items}")
            first, count = (start, length + 1) if name in spans else (start + 1, length)
            columns[name] = list_array(count, gather_ragged(column_values, first, count))
        else:
            columns[name] = table.column(name).take(pa.array(row, type=pa.int64()))
    return pa.table(columns)
