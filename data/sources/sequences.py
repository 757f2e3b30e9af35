"""A `user item item ...` text file (optionally compressed), one line per user, oldest item first, with an
optional attribute JSON `{"item": [attribute, ...]}`. Positions stand in for time.

Ids are decimal integers unless `string_ids` (the flag `--string-ids`): a stray token such as `x` is an error
naming the line, never a new item. A user on two lines is an error too, since the order of their events
would be undefined.
"""

from __future__ import annotations

import json

import pyarrow as pa

from data.errors import DataError
from data.sources.files import data_files, require_file
from data.sources.raw import Coverage, Part, RawSource, long_form
from storage import StorageError, location

ATTRIBUTE = "i_attr"


def canonical_key(key: str, string_ids: bool) -> str:
    """'007' is item 7, as the sequence file's integer tokens are read."""
    if string_ids or not key.isdigit():
        return key
    return key.lstrip("0") or "0"


def attributes(uri: str, string_ids: bool) -> pa.Table:
    where = require_file(uri)
    try:
        mapping = json.loads(where.read_text())
    except (json.JSONDecodeError, StorageError) as err:
        raise DataError(where, None, 'a JSON object {"item": [attribute, ...]}', str(err)) from None
    if not isinstance(mapping, dict):
        raise DataError(where, None, 'a JSON object {"item": [attribute, ...]}', type(mapping).__name__)
    keys, values = [], []
    for key, value in mapping.items():
        for attribute in value if isinstance(value, list) else [value]:
            keys.append(canonical_key(str(key), string_ids))
            values.append(str(attribute))
    return long_form(pa.array(keys, pa.string()), ATTRIBUTE, pa.array(values, pa.string()))


def read_sequences(path: str, item_attributes: str | None = None, string_ids: bool = False) -> RawSource:
    files = data_files(path, "sequence file")
    kind = pa.string() if string_ids else pa.int64()
    parts = [Part(i, f.uri, "sequences", (("string_ids", string_ids),)) for i, f in enumerate(files)]
    where = location(path)
    source = RawSource("sequences", parts, kind, kind, has_time=False, has_rating=False,
                       origin={"user": f"{where}:user", "item": f"{where}:items", "ts": f"{where}:position"},
                       files=[f.uri for f in files])
    if item_attributes is not None:
        features = attributes(item_attributes, string_ids)
        source.item_features = features
        source.multi_valued.add(ATTRIBUTE)
        source.files.append(location(item_attributes).uri)
        source.coverage.append(Coverage("item", location(item_attributes).uri,
                                        pa.array(sorted(set(features.column("key").to_pylist())), pa.string())))
    return source
