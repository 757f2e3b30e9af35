"""Validation every reader shares, on Arrow arrays as they stream: ids, times, ratings and text tokens.

Every failure is a `DataError` naming the file, the column, the line (text files) or row (Parquet) and the
offending value. Nothing is coerced silently: a token that is not what the column promises stops prepare
rather than becoming a wrong id, a NaN rating or a garbage timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import DataError

INT64_DIGITS = 18  # every 18-digit integer fits int64; longer ones may not


@dataclass(frozen=True)
class Where:
    """Where a batch sits in its file: row `offset` is its first row; `first_line` is the line of data row 0 in
    a text file (2 under a CSV header), None for Parquet (rows are counted)."""

    path: str
    first_line: int | None
    offset: int = 0

    def at(self, row: int) -> str:
        row += self.offset
        return f"row {row + 1}" if self.first_line is None else f"line {row + self.first_line}"

    def shifted(self, rows: int) -> "Where":
        return Where(self.path, self.first_line, self.offset + rows)


def first(mask: pa.Array) -> int:
    return int(np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool))[0])


def combined(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def check_no_nulls(array: pa.Array, where: Where, column: str) -> None:
    if array.null_count:
        raise DataError(where.path, column, "no nulls", f"a null on {where.at(first(array.is_null()))}")


def describe_token(token: str) -> str:
    digits = token.strip().lstrip("-")
    if digits.isdigit() and len(digits) > INT64_DIGITS:
        return f"{token!r} (beyond int64)"
    return repr(token)


def integer_tokens(tokens: pa.Array, where: Where, column: str, what: str = "non-negative integer ids") -> pa.Array:
    """Strict decimal integers -> int64 (negative ones only when `what` is not about ids); names the first bad
    token."""
    tokens = combined(tokens)
    check_no_nulls(tokens, where, column)
    signed = "ids" not in what
    pattern = r"^\s*%s\d{1,%d}\s*$" % ("-?" if signed else "", INT64_DIGITS)
    ok = pc.match_substring_regex(tokens, pattern)
    if not pc.all(ok).as_py():
        row = first(pc.invert(ok))
        token = tokens[row].as_py()
        found = f"{describe_token(token)} on {where.at(row)}"
        if not signed and token.strip().startswith("-") and token.strip()[1:].isdigit():
            found = f"{token!r} (negative) on {where.at(row)}"
        raise DataError(where.path, column, what, found)
    return pc.cast(pc.utf8_trim_whitespace(tokens), pa.int64())


def id_column(array: pa.Array, where: Where, column: str, target: pa.DataType, integer: bool = False) -> pa.Array:
    """Raw ids of one batch in the source's id type (`target`: int64 or string). Integer columns must be
    non-negative; text ids must be non-empty (and decimal integers when `integer`, as MovieLens defines them);
    floats are never ids, since one beyond 2**53 or with decimals cannot be exact."""
    array = combined(array)
    check_no_nulls(array, where, column)
    kind = array.type
    if pa.types.is_integer(kind):
        values = array.to_numpy()
        if np.any(values < 0):
            row = int(np.flatnonzero(values < 0)[0])
            raise DataError(where.path, column, "non-negative ids", f"{int(values[row])} on {where.at(row)}")
        if pa.types.is_uint64(kind) and np.any(values > np.iinfo(np.int64).max):
            row = int(np.flatnonzero(values > np.iinfo(np.int64).max)[0])
            raise DataError(where.path, column, "ids below 2**63", f"{int(values[row])} on {where.at(row)}")
        ids = pc.cast(array, pa.int64())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        array = pc.cast(array, pa.string())
        if integer:
            ids = integer_tokens(array, where, column)
        else:
            empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0)
            if pc.any(empty).as_py():
                raise DataError(where.path, column, "non-empty ids", f"an empty id on {where.at(first(empty))}")
            ids = array
    elif pa.types.is_floating(kind):
        values = array.to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values) | (values != np.floor(values)) | (np.abs(values) >= 2.0**53)
        row = int(np.flatnonzero(bad)[0]) if bad.any() else 0
        raise DataError(where.path, column, "integer or string ids",
                        f"{values[row].item()!r} on {where.at(row)} (a float column: store ids as integers or strings)")
    else:
        raise DataError(where.path, column, "integer or string ids", f"type {kind}")
    if ids.type != target:
        if pa.types.is_string(target):
            return pc.cast(ids, pa.string())
        raise DataError(where.path, column, "integer ids, like the source's first part", f"type {kind}")
    return ids


def time_column(array: pa.Array, where: Where, column: str) -> pa.Array:
    """Event times as int64 (seconds for timestamps and dates). Fractional numbers are truncated; events tied
    after truncation keep their order in the file."""
    array = combined(array)
    check_no_nulls(array, where, column)
    kind = array.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        return pc.cast(pc.cast(array, pa.timestamp("s")), pa.int64())
    if pa.types.is_integer(kind):
        return pc.cast(array, pa.int64())
    if pa.types.is_floating(kind):
        values = array.to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values) | (np.abs(values) >= 2.0**62)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(where.path, column, "finite times", f"{values[row].item()!r} on {where.at(row)}")
        return pa.array(values.astype(np.int64), pa.int64())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return integer_tokens(pc.cast(array, pa.string()), where, column, "a numeric or timestamp column (integers)")
    raise DataError(where.path, column, "a numeric or timestamp column", f"type {kind}")


def numeric_column(array: pa.Array, where: Where, column: str) -> pa.Array:
    """Ratings of a generic table: any finite numbers (the --min-*-rating thresholds give them meaning)."""
    array = combined(array)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise DataError(where.path, column, "numbers", f"type {array.type}")
    check_no_nulls(array, where, column)
    values = array.to_numpy(zero_copy_only=False).astype(np.float64)
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise DataError(where.path, column, "finite numbers", f"{values[row].item()!r} on {where.at(row)}")
    return pa.array(values, pa.float64())


def star_ratings(tokens: pa.Array, where: Where, column: str) -> pa.Array:
    """MovieLens ratings: numbers on the 0.5-5 star scale in half stars."""
    tokens = combined(tokens)
    if pa.types.is_string(tokens.type) or pa.types.is_large_string(tokens.type):
        text = pc.utf8_trim_whitespace(pc.fill_null(tokens, ""))
        numeric = pc.match_substring_regex(text, r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
        values = pc.cast(pc.if_else(numeric, text, "nan"), pa.float64()).to_numpy(zero_copy_only=False)
    else:
        values = pc.cast(pc.fill_null(pc.cast(tokens, pa.float64()), float("nan")), pa.float64()).to_numpy(
            zero_copy_only=False)
    bad = ~np.isfinite(values) | (values < 0.5) | (values > 5.0) | (values * 2 != np.round(values * 2))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(where.path, column, "ratings from 0.5 to 5 stars in half stars",
                        f"{str(tokens[row].as_py())!r} on {where.at(row)}")
    return pa.array(values, pa.float64())
