"""`RawData`, what every reader returns, and the long-form feature helpers.

Features are kept in long form (one row per (entity, feature, value)) so that multi-valued
features such as genres need no per-row Python when they are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

MAX_EXAMPLES = 5  # ids quoted in a warning


@dataclass
class RawData:
    """Raw events and features with raw ids as strings; `origin` names files for error messages."""

    events: pd.DataFrame  # user, item (str), ts (int64), rating (float64, NaN when the source has none)
    item_features: pd.DataFrame  # item, feature, value (all str), long form
    user_features: pd.DataFrame  # user, feature, value (all str), long form
    titles: pd.DataFrame  # item, title
    multi_valued: set[str]  # feature names that are lists (the others are scalars)
    files: list[Path]
    has_time: bool
    origin: dict[str, str] = field(default_factory=dict)  # "user"/"item"/"ts" -> "file:column"
    params: dict = field(default_factory=dict)  # generator settings, recorded in the metadata
    warnings: list[str] = field(default_factory=list)  # printed by prepare; nothing was dropped for them


def empty_features(key: str) -> pd.DataFrame:
    return pd.DataFrame({key: pd.Series(dtype=str), "feature": pd.Series(dtype=str), "value": pd.Series(dtype=str)})


def no_titles() -> pd.DataFrame:
    return pd.DataFrame({"item": pd.Series(dtype=str), "title": pd.Series(dtype=str)})


def long_form(key: str, ids: pd.Series, feature: str, values: pd.Series, sep: str | None = None) -> pd.DataFrame:
    """Builds (key, feature, value) rows; `sep` splits multi-valued strings such as 'Action|Comedy'."""
    frame = pd.DataFrame({key: ids.astype(str).to_numpy(), "value": values.astype(str).to_numpy()})
    if sep is not None:
        frame["value"] = frame["value"].str.split(sep, regex=False)
        frame = frame.explode("value")
    frame = frame[frame["value"].notna() & (frame["value"] != "")]
    frame.insert(1, "feature", feature)
    return frame.reset_index(drop=True)


def concat_features(key: str, parts: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(parts, ignore_index=True) if parts else empty_features(key)


def events_frame(users: pd.Series | np.ndarray, items: pd.Series | np.ndarray, ts: np.ndarray,
                 rating: np.ndarray | None) -> pd.DataFrame:
    return pd.DataFrame({
        "user": pd.Series(users).astype(str).to_numpy(),
        "item": pd.Series(items).astype(str).to_numpy(),
        "ts": np.asarray(ts, dtype=np.int64),
        "rating": np.full(len(users), np.nan) if rating is None else np.asarray(rating, dtype=np.float64),
    })


def coverage_warning(kind: str, used: pd.Series, described: pd.Series | None, path: Path) -> str | None:
    """A warning when events name ids that the side table (movies, users) lacks, or the table is missing."""
    if described is None:
        return f"{path} not found: {kind}s get no side features or titles"
    missing = np.setdiff1d(pd.unique(used.astype(str)), described.astype(str).to_numpy())
    if not len(missing):
        return None
    examples = ", ".join(sorted(missing, key=lambda s: (len(s), s))[:MAX_EXAMPLES])
    return (f"{path}: {len(missing)} {kind} ids of the events are not listed (e.g. {examples}); "
            f"they get no side features{' or titles' if kind == 'item' else ''}")
