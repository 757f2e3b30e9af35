"""Validation every reader shares: files, encodings, and id, time and rating columns.

Every failure is a `DataError` naming the file, the column, the line (text files) or row (Parquet)
and the offending value. Nothing is coerced silently: a token that is not what the column promises
stops prepare rather than becoming a wrong id, a NaN rating or a garbage timestamp.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from data.errors import DataError

PARQUET_SUFFIXES = (".parquet", ".pq")
INT64_DIGITS = 18  # every 18-digit integer fits int64; longer ones may not


def require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "an existing file", "no such file")
    if not path.is_file():
        raise DataError(path, None, "a file", "a directory" if path.is_dir() else "not a regular file")
    if path.stat().st_size == 0:
        raise DataError(path, None, "at least one row", "an empty file")
    return path


def position(row: int, first_line: int | None) -> str:
    """How a user finds data row `row` (0-based): a line of a text file, or a row of a Parquet file."""
    return f"row {row + 1}" if first_line is None else f"line {row + first_line}"


def read_delimited(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """A headerless MovieLens-style file as strings. '::' is rewritten to a tab so pandas' fast C
    parser applies; errors still name the file's own separator and the line."""
    raw = require_file(path).read_bytes()
    parse_sep = sep
    if len(sep) > 1:
        raw, parse_sep = raw.replace(sep.encode(), b"\t"), "\t"
    expected = f"{len(names)} '{sep}'-separated fields per line ({', '.join(names)})"
    try:
        frame = pd.read_csv(io.BytesIO(raw), sep=parse_sep, header=None, names=names, encoding=encoding,
                            dtype=str, keep_default_na=False, quoting=3)
    except pd.errors.ParserError as err:
        found = str(err).strip().replace("C error: ", "")
        raise DataError(path, None, expected, found) from err
    except UnicodeDecodeError as err:
        raise DataError(path, None, f"text in {encoding}", str(err)) from err
    if frame.empty:
        raise DataError(path, None, "at least one row", "no rows")
    short = frame[names[-1]].isna().to_numpy()
    if short.any():
        line = int(np.flatnonzero(short)[0]) + 1
        count = len(names) - int(frame.iloc[line - 1].isna().sum())
        raise DataError(path, None, expected, f"{count} on line {line}")
    return frame


def first_bad_integer(text: pd.Series, signed: bool = False) -> int | None:
    """Index of the first token that is not a decimal integer within int64 (non-negative unless `signed`)."""
    pattern = (r"-?\d{1,%d}" if signed else r"\d{1,%d}") % INT64_DIGITS
    ok = text.str.fullmatch(pattern).to_numpy(dtype=bool)
    return None if ok.all() else int(np.flatnonzero(~ok)[0])


def describe_token(token: str) -> str:
    token = str(token)
    return f"{token!r} (beyond int64)" if token.lstrip("-").isdigit() else repr(token)


def integer_tokens(tokens: pd.Series, path: Path, column: str, first_line: int | None,
                   what: str = "non-negative integer ids") -> np.ndarray:
    """Strict decimal integers -> int64 (signed unless `what` is about ids); names the first bad token."""
    text = tokens.astype(str).str.strip()
    bad = first_bad_integer(text, signed="ids" not in what)
    if bad is not None:
        raise DataError(path, column, what, f"{describe_token(text.iloc[bad])} on {position(bad, first_line)}")
    return text.to_numpy().astype(np.int64)


def star_ratings(tokens: pd.Series, path: Path, column: str, first_line: int | None) -> np.ndarray:
    """MovieLens ratings: numbers on the 0.5-5 star scale in half stars."""
    values = pd.to_numeric(tokens, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0.5) | (values > 5.0) | (values * 2 != np.round(values * 2))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(path, column, "ratings from 0.5 to 5 stars in half stars",
                        f"{tokens.iloc[row]!r} on {position(row, first_line)}")
    return values


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def read_table(path: str | Path, columns: list[str] | None = None, encoding: str = "utf-8",
               string_columns: list[str] = ()) -> pa.Table:
    """CSV or Parquet as Arrow. CSV id columns are read as text (`string_columns`), so an id longer
    than int64 stays exact; undecodable text names the encoding flag to use."""
    path = require_file(path)
    parquet = is_parquet(path)
    try:
        if parquet:
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(encoding=encoding),
                                   convert_options=pacsv.ConvertOptions(
                                       column_types={c: pa.string() for c in string_columns}))
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, LookupError) as err:
        message = str(err).splitlines()[0]
        if "UTF8" in message or "utf-8" in message.lower() or "codec" in message:
            raise DataError(path, None, f"text in the {encoding} encoding (pass --encoding latin-1, or the "
                                        f"file's own encoding)", message) from err
        kind = "Parquet" if parquet else "CSV"
        raise DataError(path, None, f"a valid {kind} file", message) from err
    if table.num_rows == 0:
        raise DataError(path, None, "at least one row", "no rows")
    for name in table.column_names:
        if pa.types.is_binary(table.column(name).type) and not parquet:
            raise DataError(path, name, f"text in the {encoding} encoding (pass --encoding latin-1, or the "
                                        f"file's own encoding)", "bytes that do not decode")
    for column in columns or []:
        if column not in table.column_names:
            raise DataError(path, column, "a column with this name (set it with the matching --*-col flag)",
                            f"columns {table.column_names}")
    return table


def first_line_of(path: Path) -> int | None:
    """The line of data row 0: 2 under a CSV header; None for Parquet (rows are counted)."""
    return None if is_parquet(path) else 2


def check_no_nulls(array: pa.ChunkedArray, path: Path, column: str) -> None:
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, column, "no nulls",
                        f"{array.null_count} nulls, the first on {position(row, first_line_of(path))}")


def id_column(table: pa.Table, column: str, path: Path, integer: bool = False) -> pd.Series:
    """Ids as strings. Integers, or text unless `integer` (MovieLens); floats are never ids, since
    one beyond 2**53 or with decimals cannot be exact."""
    array = table.column(column)
    check_no_nulls(array, path, column)
    first_line = first_line_of(path)
    if pa.types.is_integer(array.type):
        values = array.to_numpy()
        if np.any(values < 0):
            row = int(np.flatnonzero(values < 0)[0])
            raise DataError(path, column, "non-negative ids", f"{int(values[row])} on {position(row, first_line)}")
        return pd.Series(values).astype(str)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        tokens = pd.Series(array.to_pandas())
        if integer:
            return pd.Series(integer_tokens(tokens, path, column, first_line)).astype(str)
        return tokens.astype(str)
    if pa.types.is_floating(array.type):
        values = array.to_numpy()
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= 2.0**53)
        row = int(np.flatnonzero(bad)[0]) if bad.any() else 0
        raise DataError(path, column, "integer or string ids",
                        f"{values[row].item()!r} on {position(row, first_line)} (a float column: store ids as integers "
                        f"or strings)")
    raise DataError(path, column, "integer or string ids", f"type {array.type}")


def time_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    """Event times as int64 (seconds for timestamps and dates). Fractional numbers are truncated;
    events tied after truncation keep their order in the file."""
    array = table.column(column)
    check_no_nulls(array, path, column)
    if pa.types.is_timestamp(array.type) or pa.types.is_date(array.type):
        return array.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
    if pa.types.is_integer(array.type):
        return array.to_numpy().astype(np.int64)
    if pa.types.is_floating(array.type):
        values = array.to_numpy()
        bad = ~np.isfinite(values) | (np.abs(values) >= 2.0**62)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            where = position(row, first_line_of(path))
            raise DataError(path, column, "finite times", f"{values[row].item()!r} on {where}")
        return values.astype(np.int64)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return integer_tokens(pd.Series(array.to_pandas()), path, column, first_line_of(path),
                              "a numeric or timestamp column (integers)")
    raise DataError(path, column, "a numeric or timestamp column", f"type {array.type}")


def numeric_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    """Ratings of a generic table: any finite numbers (the --min-*-rating thresholds give them meaning)."""
    array = table.column(column)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise DataError(path, column, "numbers", f"type {array.type}")
    check_no_nulls(array, path, column)
    values = array.to_numpy().astype(np.float64)
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        where = position(row, first_line_of(path))
        raise DataError(path, column, "finite numbers", f"{values[row].item()!r} on {where}")
    return values
