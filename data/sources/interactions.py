"""A generic interactions table (CSV or Parquet), with optional item and user feature tables.

Ids may be integers or text (CSV ids are read as text, so ids beyond int64 stay exact); times are
integers, floats (truncated) or timestamps; ratings any finite numbers. Feature-table columns are
features: list columns, and text joined by `--feature-sep`, are multi-valued.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from data.sources.columns import id_column, numeric_column, read_table, time_column
from data.sources.raw import RawData, concat_features, coverage_warning, events_frame, long_form, no_titles


def feature_table(path: Path, key_col: str, key: str, prefix: str, skip: set[str], sep: str, encoding: str,
                  integer_ids: bool) -> tuple[pd.DataFrame, set[str], pd.DataFrame, pd.Series]:
    """Long-form features, the multi-valued feature names, titles (a `title` column) and the key ids."""
    table = read_table(path, [key_col], encoding, string_columns=[key_col])
    ids = id_column(table, key_col, path, integer_ids)
    parts, multi = [], set()
    for name in [c for c in table.column_names if c != key_col and c not in skip]:
        array = table.column(name)
        feature = prefix + re.sub(r"\W+", "_", name).lower()
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            multi.add(feature)
            lengths = array.combine_chunks().value_lengths().fill_null(0).to_numpy()
            values = pd.Series(array.combine_chunks().flatten().to_numpy(zero_copy_only=False)).astype(str)
            parts.append(pd.DataFrame({key: np.repeat(ids.to_numpy(), lengths), "feature": feature,
                                       "value": values.to_numpy()}))
            continue
        column = pd.Series(array.to_pandas())
        is_multi = not pd.api.types.is_numeric_dtype(column) and column.astype(str).str.contains(sep, regex=False).any()
        if is_multi:
            multi.add(feature)
        parts.append(long_form(key, ids, feature, column.where(column.notna(), ""), sep=sep if is_multi else None))
    titles = pd.DataFrame({"item": ids.to_numpy(), "title": table.column("title").to_pandas().astype(str)}) \
        if "title" in table.column_names else no_titles()
    return concat_features(key, parts), multi, titles, ids


def read_interactions(path: str | Path, user_col: str, item_col: str, time_col: str,
                      rating_col: str | None = None, item_features: str | Path | None = None,
                      user_features: str | Path | None = None, feature_sep: str = "|", encoding: str = "utf-8",
                      integer_ids: bool = False) -> RawData:
    """`integer_ids`: ids must be decimal integers (for sources that define them so, like MovieLens)."""
    path = Path(path)
    table = read_table(path, [user_col, item_col, time_col] + ([rating_col] if rating_col else []), encoding,
                       string_columns=[user_col, item_col])
    events = events_frame(id_column(table, user_col, path, integer_ids), id_column(table, item_col, path, integer_ids),
                          time_column(table, time_col, path),
                          numeric_column(table, rating_col, path) if rating_col else None)
    raw = RawData(events, concat_features("item", []), concat_features("user", []), no_titles(), set(), [path], True,
                  {"user": f"{path}:{user_col}", "item": f"{path}:{item_col}", "ts": f"{path}:{time_col}"})
    if item_features is not None:
        item_path = Path(item_features)
        raw.item_features, multi, raw.titles, ids = feature_table(item_path, item_col, "item", "i_", {"title"},
                                                                  feature_sep, encoding, integer_ids)
        raw.multi_valued |= multi
        raw.files.append(item_path)
        raw.warnings.append(coverage_warning("item", events["item"], ids, item_path))
    if user_features is not None:
        user_path = Path(user_features)
        raw.user_features, multi, _, ids = feature_table(user_path, user_col, "user", "u_", set(), feature_sep,
                                                         encoding, integer_ids)
        raw.multi_valued |= multi
        raw.files.append(user_path)
        raw.warnings.append(coverage_warning("user", events["user"], ids, user_path))
    raw.warnings = [w for w in raw.warnings if w]
    return raw
