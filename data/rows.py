"""A block of examples as numpy arrays (CSR for list columns) plus one trailing pad row.

Batches are index arrays into a block, so shuffling costs nothing until the batch's own values
are gathered, and padding is just the index of the pad row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from data.parquet import Column
from data.ragged import gather_ragged, list_offsets_values, offsets_from_lengths


class Rows:
    def __init__(self, lists: dict[str, tuple[np.ndarray, np.ndarray]], scalars: dict[str, np.ndarray], n: int):
        self.lists, self.scalars, self.n = lists, scalars, n

    @classmethod
    def from_tables(cls, tables: list[pa.Table], columns: list[Column]) -> "Rows":
        n = sum(len(t) for t in tables)
        lists, scalars = {}, {}
        for column in columns:
            if column.multi:
                parts = [list_offsets_values(t.column(column.name)) for t in tables]
                lengths = np.concatenate([np.diff(o) for o, _ in parts] + [np.zeros(1, dtype=np.int64)])
                values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, dtype=np.int64)
                lists[column.name] = (offsets_from_lengths(lengths), values)
            else:
                scalars[column.name] = np.concatenate([t.column(column.name).to_numpy() for t in tables]
                                                      + [np.zeros(1, dtype=np.int64)])
        return cls(lists, scalars, n)

    @property
    def pad(self) -> int:
        return self.n

    def columns(self) -> dict[str, np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """Every column by name: CSR (offsets, values) for lists, an array for scalars."""
        return {**self.lists, **self.scalars}

    def ragged(self, name: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offsets, values = self.lists[name]
        lengths = offsets[idx + 1] - offsets[idx]
        return lengths, gather_ragged(values, offsets[idx], lengths)

    def take(self, idx: np.ndarray) -> "Rows":
        lists = {}
        for name in self.lists:
            lengths, values = self.ragged(name, np.r_[idx, self.pad])
            lists[name] = (offsets_from_lengths(lengths), values)
        return Rows(lists, {k: v[np.r_[idx, self.pad]] for k, v in self.scalars.items()}, len(idx))


def concat_rows(a: Rows, b: Rows) -> Rows:
    """Concatenation without either block's pad row; the result gets a fresh one."""
    lists = {}
    for name, (a_off, a_val) in a.lists.items():
        b_off, b_val = b.lists[name]
        lengths = np.concatenate([np.diff(a_off)[:a.n], np.diff(b_off)[:b.n], [0]])
        lists[name] = (offsets_from_lengths(lengths), np.concatenate([a_val[:a_off[a.n]], b_val[:b_off[b.n]]]))
    scalars = {k: np.concatenate([v[:a.n], b.scalars[k][:b.n], [0]]) for k, v in a.scalars.items()}
    return Rows(lists, scalars, a.n + b.n)
