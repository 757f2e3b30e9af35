"""Vectorised helpers for jagged (CSR) arrays: the only way rows become lists here, no per-row Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def gather_ragged(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenates values[starts[i] : starts[i] + lengths[i]] over all rows i."""
    lengths = np.asarray(lengths, dtype=np.int64)
    shift = np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths)
    index = np.repeat(shift, lengths)
    index += np.arange(len(index), dtype=np.int64)
    return values[index]


def gather_csr(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lengths and values of the CSR rows `rows` (for example the features of sampled items)."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    return lengths, gather_ragged(values, starts, lengths)


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def padded_rows(lengths: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """(rows, width) int64: CSR row i (lengths[i] <= width values) left-aligned, zeros after it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros((len(lengths), width), dtype=np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    out[row, np.arange(len(values)) - np.repeat(offsets_from_lengths(lengths)[:-1], lengths)] = values
    return out


def list_array(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """An Arrow list<int64> column from lengths and flat values (zero-copy for the values)."""
    offsets = pa.array(offsets_from_lengths(lengths).astype(np.int32), type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(np.asarray(values, dtype=np.int64), type=pa.int64()))


def list_offsets_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Arrow list column -> (offsets starting at 0, values), honouring slices; no per-row Python."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy()
    values = values[offsets[0]:offsets[-1]]
    return offsets - offsets[0], values


def pack_lanes(lengths: np.ndarray, width: int) -> np.ndarray:
    """(rows, 2) int64: the lane and first column of each row when rows are packed, whole and unsplit, into lanes of
    `width` columns by first-fit decreasing (the longest row first, each into the first lane with room). Empty
    rows take no room (lane 0, column 0). The sequence towers' stack then runs on lanes x width positions
    instead of rows x width, with attention kept inside each row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > width:
        raise ValueError(f"a row of {int(lengths.max())} items does not fit a lane of {width}")
    out = np.zeros((len(lengths), 2), dtype=np.int64)
    fill = np.zeros(len(lengths) + 1, dtype=np.int64)  # columns used in each lane; at most one lane per row
    used = 0
    for row in np.argsort(-lengths, kind="stable"):
        n = lengths[row]
        if n == 0:
            break
        lane = int(np.argmax(fill[:used + 1] + n <= width))  # lane `used` is empty, so one always fits
        out[row] = lane, fill[lane]
        fill[lane] += n
        used = max(used, lane + 1)
    return out
