"""Raw files on any storage: one file or a directory of parts (what Spark, Hive and warehouse exports write),
CSV read as a stream, Parquet by row groups. Failures are `DataError`s naming the file."""

from __future__ import annotations

import io
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.errors import DataError
from storage import Location, StorageError, location

PARQUET_SUFFIXES = (".parquet", ".pq")
TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".dat", ".data")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
CSV_BLOCK = 1 << 22  # bytes per CSV block (bounds the memory of a streaming read)
ROW_GROUPS_PER_PART = 8  # a large Parquet file is read as several parts, by row groups


def is_parquet(name: str) -> bool:
    stem = name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.endswith(PARQUET_SUFFIXES) or ".parquet" in stem


def is_text(name: str) -> bool:
    stem = name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        stem = stem.removesuffix(suffix)
    return stem.endswith(TEXT_SUFFIXES)


def hidden(relative: str) -> bool:
    """Files a writer keeps beside its parts: `_SUCCESS`, `_committed_*`, `.part-0.crc`, `_temporary/`."""
    return any(piece.startswith(("_", ".")) for piece in relative.split("/")) or relative.endswith(".crc")


def require_file(where: Location | str) -> Location:
    where = location(where)
    try:
        info = where.info()
    except StorageError as err:
        raise DataError(where, None, "a readable file", err.problem) from None
    if info.type.name == "NotFound":
        raise DataError(where, None, "an existing file", "no such file")
    if info.type.name != "File":
        raise DataError(where, None, "a file", "a directory" if info.type.name == "Directory" else "not a regular file")
    if info.size == 0:
        raise DataError(where, None, "at least one row", "an empty file")
    return where


def data_files(uri: str, what: str) -> list[Location]:
    """The files of an input: the file itself, or every data file under a directory (sorted, hidden files
    skipped, empty parts skipped)."""
    where = location(uri)
    try:
        info = where.info()
    except StorageError as err:
        raise DataError(where, None, f"a readable {what}", err.problem) from None
    if info.type.name == "File":
        return [require_file(where)]
    if info.type.name != "Directory":
        raise DataError(where, None, f"an existing {what} (a file, or a directory of parts)", "no such file")
    sizes = where.files()
    names = [name for name, size in sorted(sizes.items()) if size > 0 and not hidden(name)]
    unknown = [n for n in names if not (is_parquet(n) or is_text(n))]
    if unknown:
        raise DataError(where / unknown[0], None, "a .parquet or .csv part (other formats are not read)",
                        "an unknown file type")
    if not names:
        raise DataError(where, None, f"a {what}: Parquet or CSV parts", "no non-empty data files")
    return [where / name for name in names]


def parquet_file(where: Location) -> pq.ParquetFile:
    try:
        return where.parquet_file()
    except StorageError as err:
        problem = err.problem.removeprefix("cannot read it as Parquet: ")
        raise DataError(where, None, "a valid Parquet file" if problem != err.problem else "a readable Parquet file",
                        problem) from None


def row_group_parts(file: pq.ParquetFile) -> list[tuple[tuple[int, ...], int]]:
    """(row groups, first row) of each part a Parquet file is read as."""
    meta = file.metadata
    starts, row = [], 0
    for rg in range(meta.num_row_groups):
        starts.append(row)
        row += meta.row_group(rg).num_rows
    groups = list(range(meta.num_row_groups))
    return [(tuple(groups[i:i + ROW_GROUPS_PER_PART]), starts[i]) for i in range(0, len(groups), ROW_GROUPS_PER_PART)]


def require_columns(names: list[str], wanted: list[str], where: Location) -> None:
    for column in wanted:
        if column not in names:
            raise DataError(where, column, "a column with this name (set it with the matching --*-col flag)",
                            f"columns {names}")


class Replacing(io.RawIOBase):
    """A byte stream with every `old` replaced by `new` (MovieLens's '::' becomes one character that pyarrow's
    CSV parser takes), safe where `old` straddles two reads."""

    def __init__(self, source: pa.NativeFile, old: bytes, new: bytes):
        super().__init__()
        self.source, self.old, self.new = source, old, new
        self.pending = b""
        self.carry = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            block = self.source.read(1 << 20)
            data = self.carry + block
            if not block:
                self.pending, self.carry = data.replace(self.old, self.new), b""
                if not self.pending:
                    return 0
                break
            keep = next((k for k in range(len(self.old) - 1, 0, -1) if data.endswith(self.old[:k])), 0)
            self.carry = data[len(data) - keep:] if keep else b""
            self.pending = data[:len(data) - keep].replace(self.old, self.new)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


def csv_batches(where: Location, encoding: str = "utf-8", column_names: list[str] | None = None,
                delimiter: str = ",", string_columns: list[str] = (), include: list[str] | None = None,
                quoting: bool = True) -> Iterator[pa.RecordBatch]:
    """A CSV file as record batches, streamed with bounded memory. Headerless files pass `column_names`; a
    multi-character delimiter (MovieLens '::') is rewritten on the fly. A wrong field count names the line;
    text that does not decode names the `--encoding` flag."""
    bad_rows: list = []

    def on_invalid(row) -> str:
        bad_rows.append(row)
        return "error"

    try:
        stream = where.open_input_stream()
        if len(delimiter) > 1:
            stream = pa.PythonFile(io.BufferedReader(Replacing(stream, delimiter.encode(), b"\x1f")), mode="r")
        if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
            stream = pa.transcoding_input_stream(stream, encoding, "utf-8")
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK, column_names=column_names),
            parse_options=pacsv.ParseOptions(delimiter="\x1f" if len(delimiter) > 1 else delimiter,
                                             quote_char='"' if quoting else False, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in string_columns},
                                                 include_columns=include, strings_can_be_null=False))
        for batch in reader:
            yield batch
    except StorageError as err:
        raise DataError(where, None, "a readable file", err.problem) from None
    except (pa.ArrowInvalid, pa.ArrowKeyError, OSError, LookupError, ValueError) as err:
        raise csv_error(err, where, encoding, delimiter, column_names, bad_rows) from None


def csv_error(err: Exception, where: Location, encoding: str, delimiter: str, names: list[str] | None,
              bad_rows: list) -> DataError:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    if bad_rows:
        row = bad_rows[0]
        expected = (f"{row.expected_columns} '{delimiter}'-separated fields per line ({', '.join(names)})" if names
                    else f"{row.expected_columns} fields per line, as the header has")
        line = row.number if row.number is not None and row.number > 0 else None
        return DataError(where, None, expected, f"{row.actual_columns}" + (f" on line {line}" if line else ""))
    if "UTF8" in message or "utf-8" in message.lower() or "codec" in message or "decode" in message.lower():
        return DataError(where, None, f"text in the {encoding} encoding (pass --encoding latin-1, or the file's own "
                                      f"encoding)", message)
    if "Empty CSV file" in message or "no rows" in message.lower():
        return DataError(where, None, "at least one row", "no rows")
    return DataError(where, None, "a valid CSV file", message)


def read_small_table(where: Location, encoding: str = "utf-8", string_columns: list[str] = (),
                     wanted: list[str] = ()) -> pa.Table:
    """A side table (features, titles) read whole: CSV or Parquet, with at least one row and the wanted
    columns."""
    where = require_file(where)
    if is_parquet(where.name):
        try:
            table = parquet_file(where).read()
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(where, None, "a valid Parquet file", str(err).splitlines()[0]) from None
    else:
        batches = list(csv_batches(where, encoding, string_columns=list(string_columns)))
        table = pa.Table.from_batches(batches) if batches else pa.table({})
    if table.num_rows == 0:
        raise DataError(where, None, "at least one row", "no rows")
    require_columns(table.column_names, list(wanted), where)
    return table


def delimited_table(where: Location, sep: str, names: list[str], encoding: str = "latin-1") -> pa.Table:
    """A headerless MovieLens-style side file (movies.dat, users.dat, u.item, u.user) as strings."""
    where = require_file(where)
    batches = list(csv_batches(where, encoding, column_names=names, delimiter=sep, string_columns=names,
                               quoting=False))
    table = pa.Table.from_batches(batches)
    if table.num_rows == 0:
        raise DataError(where, None, "at least one row", "no rows")
    return table


def stream_lines(where: Location, chunk: int = 1 << 22) -> Iterator[tuple[int, list[str]]]:
    """(line number, tokens) of every non-blank line of a text file (gzip and others by extension), in chunks,
    never the whole file in memory."""
    try:
        stream = where.open_input_stream()
        number, rest = 0, b""
        while True:
            block = stream.read(chunk)
            data = rest + block
            if not block:
                lines, rest = (data.splitlines() if data else []), b""
            else:
                cut = data.rfind(b"\n") + 1
                lines, rest = data[:cut].splitlines(), data[cut:]
            for line in lines:
                number += 1
                tokens = line.decode("utf-8").split()
                if tokens:
                    yield number, tokens
            if not block:
                return
    except UnicodeDecodeError as err:
        raise DataError(where, None, "UTF-8 text of 'user item item ...' lines", str(err)) from None
    except StorageError as err:
        raise DataError(where, None, "a readable text file", err.problem) from None
    except (OSError, EOFError, pa.ArrowInvalid) as err:
        raise DataError(where, None, "a text file of 'user item item ...' lines", str(err).splitlines()[0]) from None


