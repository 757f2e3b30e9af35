"""A `user item item ...` text file (optionally gzipped), one line per user, oldest item first,
with an optional attribute JSON `{"item": [attribute, ...]}`. Positions stand in for time.

Ids are decimal integers unless `string_ids` (the flag `--string-ids`): a stray token such as `x`
is an error naming the line, never a new item. A user on two lines is an error too, since the
order of their events would be undefined.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd

from data.errors import DataError
from data.sources.columns import describe_token, first_bad_integer, require_file
from data.sources.raw import RawData, concat_features, coverage_warning, events_frame, no_titles

ATTRIBUTE = "i_attr"


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of every non-blank line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return [(n, tokens) for n, line in enumerate(handle.read().splitlines(), 1) if (tokens := line.split())]
    except UnicodeDecodeError as err:
        raise DataError(path, None, "UTF-8 text of 'user item item ...' lines", str(err)) from err
    except (OSError, EOFError) as err:
        raise DataError(path, None, "a text file of 'user item item ...' lines", str(err)) from err


def canonical_ids(tokens: np.ndarray, line_of_token: np.ndarray, path: Path, column: str,
                  string_ids: bool) -> np.ndarray:
    """Tokens as id strings; integers are checked and written canonically ('007' is item 7)."""
    if string_ids:
        return tokens
    text = pd.Series(tokens)
    bad = first_bad_integer(text)
    if bad is not None:
        raise DataError(path, column, "non-negative integer ids (or pass --string-ids)",
                        f"{describe_token(tokens[bad])} on line {line_of_token[bad]}")
    return text.to_numpy().astype(np.int64).astype(str)


def attributes(path: Path, string_ids: bool) -> pd.DataFrame:
    attr_path = require_file(path)
    try:
        mapping = json.loads(attr_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(attr_path, None, 'a JSON object {"item": [attribute, ...]}', str(err)) from err
    if not isinstance(mapping, dict):
        raise DataError(attr_path, None, 'a JSON object {"item": [attribute, ...]}', type(mapping).__name__)
    keys = np.array(list(mapping), dtype=str)
    if not string_ids:
        digits = np.char.isdigit(keys)
        keys = np.where(digits, np.char.lstrip(keys, "0"), keys)
        keys = np.where(digits & (keys == ""), "0", keys)
    counts = [len(v) if isinstance(v, list) else 1 for v in mapping.values()]
    values = [str(a) for v in mapping.values() for a in (v if isinstance(v, list) else [v])]
    return pd.DataFrame({"item": np.repeat(keys, counts), "feature": ATTRIBUTE, "value": values})


def read_sequences(path: str | Path, item_attributes: str | Path | None = None, string_ids: bool = False) -> RawData:
    path = require_file(path)
    lines = read_lines(path)
    if not lines:
        raise DataError(path, None, "at least one 'user item ...' line", "no lines")
    numbers = np.array([n for n, _ in lines])
    lengths = np.array([len(tokens) - 1 for _, tokens in lines])
    if np.any(lengths < 1):
        row = int(np.flatnonzero(lengths < 1)[0])
        raise DataError(path, "items", "at least one item after the user id", f"none on line {numbers[row]}")
    users = canonical_ids(np.array([tokens[0] for _, tokens in lines]), numbers, path, "user", string_ids)
    item_tokens = np.array([item for _, tokens in lines for item in tokens[1:]])
    items = canonical_ids(item_tokens, np.repeat(numbers, lengths), path, "items", string_ids)
    unique, first, counts = np.unique(users, return_index=True, return_counts=True)
    if np.any(counts > 1):
        twice = str(unique[counts > 1][0])
        where = numbers[users == twice][:2]
        raise DataError(path, "user", "one line per user (the order of a user's events would be undefined)",
                        f"user {twice!r} on lines {where[0]} and {where[1]}")
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(items)) - starts
    raw = RawData(events_frame(np.repeat(users, lengths), items, positions, None), concat_features("item", []),
                  concat_features("user", []), no_titles(), set(), [path], False,
                  {"user": f"{path}:user", "item": f"{path}:items", "ts": f"{path}:position"})
    if item_attributes is not None:
        raw.item_features = attributes(Path(item_attributes), string_ids)
        raw.multi_valued.add(ATTRIBUTE)
        raw.files.append(Path(item_attributes))
        warning = coverage_warning("item", raw.events["item"], raw.item_features["item"].drop_duplicates(),
                                   Path(item_attributes))
        raw.warnings += [warning] if warning else []
    return raw
