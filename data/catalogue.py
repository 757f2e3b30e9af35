"""The item catalogue in memory: item features as CSR arrays (the size of the catalogue, not of the
data) and each item's training frequency. The candidate tower's input for any set of item ids."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from data import schema
from data.keys import Jagged
from data.parquet import RowGroupReader, check_ids, require_column
from data.ragged import gather_csr, list_offsets_values
from storage import Location, location


class Catalogue:
    def __init__(self, directory: "str | Location", meta: schema.Metadata):
        path = location(directory) / schema.ITEMS_FILE
        table = RowGroupReader.open(path).read()
        self.num_items = meta.num_items
        self.freq = np.r_[0, table.column(schema.FREQ).to_numpy()].astype(np.int64)
        self.features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for spec in meta.item_features:
            column = require_column(table, spec.name, path)
            if spec.multi:
                offsets, values = list_offsets_values(column)
            else:
                values = column.to_numpy()
                offsets = np.arange(len(values) + 1, dtype=np.int64)
            offsets = np.r_[0, offsets]  # row 0: the pad item has no features
            check_ids(values, spec.vocab_size, path, spec.name, "error")
            self.features[spec.name] = (offsets, values)

    def candidate_arrays(self, ids: np.ndarray) -> list[Jagged]:
        """(lengths, values) per candidate key (the item id, then each item feature) for `ids`."""
        arrays = [(np.ones(len(ids), dtype=np.int64), ids)]
        for offsets, values in self.features.values():
            arrays.append(gather_csr(offsets, values, ids))
        return arrays

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        """Every item id, padding id 0 included, in chunks of `size`: for embedding the whole catalogue."""
        for lo in range(0, self.num_items + 1, size):
            yield np.arange(lo, min(lo + size, self.num_items + 1), dtype=np.int64)


def example_history(directory: "str | Location", meta: schema.Metadata, count: int = 3) -> list[str]:
    """The raw ids of the last `count` items of the first test query with that much history: real ids a printed
    `recommend` command can use (empty when no query has them)."""
    directory = location(directory)
    if not meta.files.get(schema.TEST_DIR):
        return []
    histories = (directory / meta.files[schema.TEST_DIR][0]).read_parquet([schema.HISTORY]).column(schema.HISTORY)
    items = (directory / schema.ITEMS_FILE).read_parquet([schema.ITEM, schema.RAW_ID])
    raw = dict(zip(items.column(schema.ITEM).to_pylist(), items.column(schema.RAW_ID).to_pylist()))
    for history in histories.to_pylist():
        if len(history) >= count:
            return [str(raw[i]) for i in history[-count:]]
    return []
