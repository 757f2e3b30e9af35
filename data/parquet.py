"""Reading prepared Parquet files with validation: the schema when a file is opened, nulls and id
ranges on every row group read. A bad file fails with a `DataError` naming the file and column,
never inside an FBGEMM kernel."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data.errors import DataError
from data.ragged import list_offsets_values
from storage import Location, StorageError


@dataclass(frozen=True)
class Column:
    name: str
    vocab: int | None  # ids lie in [0, vocab); None: values that are not ids (event times), not range-checked
    multi: bool


def require_column(table: pa.Table, name: str, path: Location) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(path, name, "a column with this name (see metadata.json)", f"columns {table.column_names}")
    return table.column(name)


def check_ids(values: np.ndarray, vocab: int | None, path: Location, column: str, out_of_vocab: str) -> np.ndarray:
    """Ids must lie in [0, vocab); 'hash' folds larger ones into range instead of failing. No vocab: not ids."""
    if len(values) == 0 or vocab is None:
        return values
    low, high = values.min(), values.max()
    if low < 0:
        raise DataError(path, column, "non-negative ids", f"{int(low)}")
    if high >= vocab:
        if out_of_vocab == "hash":
            return values % vocab
        raise DataError(path, column, f"ids below the vocabulary size {vocab} (metadata.json)", f"{int(high)}")
    return values


class RowGroupReader:
    """One Parquet file: opened lazily, with every failure turned into a DataError naming the file."""

    def __init__(self, path: Location, file: pq.ParquetFile):
        self.path = path
        self.file = file

    @classmethod
    def open(cls, path: Location) -> "RowGroupReader":
        try:
            info = path.info()
            if info.type.name != "File":
                raise DataError(path, None, "an existing Parquet file", "no such file")
            if info.size == 0:
                raise DataError(path, None, "a Parquet file with at least one row", "an empty file")
            return cls(path, path.parquet_file())
        except StorageError as err:
            problem = err.problem.removeprefix("cannot read it as Parquet: ")
            raise DataError(path, None, "a valid Parquet file" if problem != err.problem else "a readable Parquet file",
                            problem) from None
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(path, None, "a valid Parquet file", str(err).splitlines()[0]) from None

    def read(self, row_group: int | None = None, columns: list[str] | None = None) -> pa.Table:
        try:
            if row_group is None:
                return self.file.read(columns=columns)
            return self.file.read_row_group(row_group, columns=columns)
        except StorageError as err:
            raise DataError(self.path, None, "a readable Parquet file", err.problem) from None
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(self.path, None, "a valid Parquet file", str(err).splitlines()[0]) from None


class ExampleSource:
    """The row groups of a split, validated: schema on open, nulls and id ranges on every read."""

    def __init__(self, paths: list[Location], columns: list[Column], out_of_vocab: str):
        if not paths:
            raise DataError("metadata.json", "files", "the Parquet parts of every split (prepare the data again)",
                            "none for this split")
        self.columns = columns
        self.out_of_vocab = out_of_vocab
        self.readers = [RowGroupReader.open(p) for p in paths]
        self.units: list[tuple[int, int]] = []
        sizes = []
        for index, reader in enumerate(self.readers):
            self.check_schema(reader)
            meta = reader.file.metadata
            if meta.num_rows == 0:
                raise DataError(reader.path, None, "at least one row", "no rows")
            for rg in range(meta.num_row_groups):
                self.units.append((index, rg))
                sizes.append(meta.row_group(rg).num_rows)
        self.sizes = np.array(sizes, dtype=np.int64)

    def check_schema(self, reader: RowGroupReader) -> None:
        arrow_schema = reader.file.schema_arrow
        for column in self.columns:
            if column.name not in arrow_schema.names:
                raise DataError(reader.path, column.name, "a column with this name (see metadata.json)",
                                f"columns {arrow_schema.names}")
            kind = arrow_schema.field(column.name).type
            if column.multi:
                ok = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)
                expected = "list<int64> ids"
            else:
                ok = pa.types.is_integer(kind)
                expected = "int64 ids"
            if not ok:
                raise DataError(reader.path, column.name, expected, f"type {kind}")

    def read(self, unit: int) -> pa.Table:
        file_index, rg = self.units[unit]
        reader = self.readers[file_index]
        table = reader.read(rg, [c.name for c in self.columns])
        for column in self.columns:
            array = table.column(column.name)
            if array.null_count:
                raise DataError(reader.path, column.name, "no nulls", f"{array.null_count} in row group {rg}")
            if column.multi:
                flat = pc.list_flatten(array)
                if flat.null_count:
                    raise DataError(reader.path, column.name, "no null list elements",
                                    f"{flat.null_count} in row group {rg}")
                values = flat.to_numpy()
                fixed = check_ids(values, column.vocab, reader.path, column.name, self.out_of_vocab)
                if fixed is not values:
                    offsets, _ = list_offsets_values(array)
                    table = table.set_column(table.column_names.index(column.name), column.name,
                                             pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                                      pa.array(fixed)))
            else:
                values = array.to_numpy()
                fixed = check_ids(values, column.vocab, reader.path, column.name, self.out_of_vocab)
                if fixed is not values:
                    table = table.set_column(table.column_names.index(column.name), column.name, pa.array(fixed))
        return table
