"""A generic interactions table: one CSV/Parquet file or a directory of parts, on any storage, with optional
item and user feature tables.

Ids may be integers or text (CSV ids are read as text, so ids beyond int64 stay exact); times are integers,
floats (truncated) or timestamps; ratings any finite numbers. Feature-table columns are features: list
columns, and text joined by `--feature-sep`, are multi-valued.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from data.sources.columns import Where, id_column
from data.sources.files import data_files, is_parquet, parquet_file, read_small_table, require_columns, row_group_parts
from data.sources.raw import Coverage, Part, RawSource, concat_features, list_long_form, long_form, titles_table
from storage import Location, location


def id_type(files: list[Location], column: str, integer_ids: bool) -> str:
    """int64 when every part stores the column as integers (or MovieLens defines integer ids), else string."""
    if integer_ids:
        return "int64"
    for where in files:
        if not is_parquet(where.name):
            return "string"
        schema = parquet_file(where).schema_arrow
        if column in schema.names and not pa.types.is_integer(schema.field(column).type):
            return "string"
    return "int64"


def table_parts(files: list[Location], options: dict, columns: list[str]) -> list[Part]:
    """Every file a part; a Parquet file with many row groups several."""
    parts = []
    for where in files:
        if is_parquet(where.name):
            file = parquet_file(where)
            require_columns(file.schema_arrow.names, columns, where)
            for groups, first_row in row_group_parts(file):
                opts = {**options, "row_groups": groups, "first_row": first_row}
                parts.append(Part(len(parts), where.uri, "table", tuple(sorted(opts.items()))))
        else:
            parts.append(Part(len(parts), where.uri, "table", tuple(sorted(options.items()))))
    return parts


def feature_table(where: Location, key_col: str, prefix: str, skip: set[str], sep: str, encoding: str,
                  integer_ids: bool) -> tuple[pa.Table, set[str], pa.Table, pa.Array]:
    """Long-form features, the multi-valued feature names, titles (a `title` column) and the key ids (text)."""
    table = read_small_table(where, encoding, string_columns=[key_col], wanted=[key_col])
    first_line = None if is_parquet(where.name) else 2
    keys = id_column(table.column(key_col), Where(str(where), first_line), key_col, pa.string(), integer_ids)
    parts, multi = [], set()
    for name in [c for c in table.column_names if c != key_col and c not in skip]:
        array = table.column(name).combine_chunks()
        feature = prefix + re.sub(r"\W+", "_", name).lower()
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            multi.add(feature)
            parts.append(list_long_form(keys, feature, array))
            continue
        text = array if pa.types.is_string(array.type) else pc.cast(array, pa.string())
        is_multi = (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) and \
            pc.any(pc.match_substring(pc.fill_null(text, ""), sep)).as_py()
        if is_multi:
            multi.add(feature)
        parts.append(long_form(keys, feature, text, sep if is_multi else None))
    titles = titles_table(keys, table.column("title").combine_chunks()) if "title" in table.column_names else None
    return concat_features(parts), multi, titles, keys


def read_interactions(path: str, user_col: str, item_col: str, time_col: str, rating_col: str | None = None,
                      item_features: str | None = None, user_features: str | None = None, feature_sep: str = "|",
                      encoding: str = "utf-8", integer_ids: bool = False, stars: bool = False) -> RawSource:
    """`integer_ids`: ids must be decimal integers; `stars`: ratings on MovieLens's 0.5-5 scale."""
    files = data_files(path, "interactions table")
    columns = [user_col, item_col, time_col] + ([rating_col] if rating_col else [])
    options = {"user": user_col, "item": item_col, "time": time_col, "rating": rating_col or "",
               "encoding": encoding, "integer_ids": integer_ids, "stars": stars,
               "user_type": id_type(files, user_col, integer_ids), "item_type": id_type(files, item_col, integer_ids)}
    parts = table_parts(files, options, columns)
    where = location(path)
    source = RawSource("interactions", parts, pa.int64() if options["user_type"] == "int64" else pa.string(),
                       pa.int64() if options["item_type"] == "int64" else pa.string(), has_time=True,
                       has_rating=bool(rating_col),
                       origin={"user": f"{where}:{user_col}", "item": f"{where}:{item_col}",
                               "ts": f"{where}:{time_col}"},
                       files=[f.uri for f in files])
    if item_features is not None:
        item_where = location(item_features)
        source.item_features, multi, titles, keys = feature_table(item_where, item_col, "i_", {"title"}, feature_sep,
                                                                  encoding, integer_ids)
        source.titles = titles if titles is not None else source.titles
        source.multi_valued |= multi
        source.files.append(item_where.uri)
        source.coverage.append(Coverage("item", item_where.uri, keys))
    if user_features is not None:
        user_where = location(user_features)
        source.user_features, multi, _, keys = feature_table(user_where, user_col, "u_", set(), feature_sep,
                                                             encoding, integer_ids)
        source.multi_valued |= multi
        source.files.append(user_where.uri)
        source.coverage.append(Coverage("user", user_where.uri, keys))
    return source
