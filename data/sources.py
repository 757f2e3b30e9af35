"""Readers for every raw source, each producing the same `RawData` so one code path prepares them all.

Features are kept in long form (one row per (entity, feature, value)) so that multi-valued
features such as genres need no per-row Python when they are encoded.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.errors import DataError

# Ages of MovieLens 1M (users.dat), reused to bucket the raw ages of MovieLens 100K.
ML_AGE_BUCKETS = np.array([1, 18, 25, 35, 45, 50, 56])
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]


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


def empty_features(key: str) -> pd.DataFrame:
    return pd.DataFrame({key: pd.Series(dtype=str), "feature": pd.Series(dtype=str), "value": pd.Series(dtype=str)})


def require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "an existing file", "no such file")
    if path.stat().st_size == 0:
        raise DataError(path, None, "at least one row", "an empty file")
    return path


def read_delimited(path: Path, sep: str, names: list[str], encoding: str = "latin-1") -> pd.DataFrame:
    """Reads MovieLens-style files; '::' is rewritten to a tab so pandas' fast C parser applies."""
    raw = require_file(path).read_bytes()
    if len(sep) > 1:
        raw, sep = raw.replace(sep.encode(), b"\t"), "\t"
    try:
        frame = pd.read_csv(io.BytesIO(raw), sep=sep, header=None, names=names, encoding=encoding,
                            dtype=str, keep_default_na=False, quoting=3)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(path, None, f"{len(names)} '{sep}'-separated fields per line", str(err)) from err
    if frame.empty:
        raise DataError(path, None, "at least one row", "no rows")
    if frame[names[-1]].isna().any():
        bad = int(np.flatnonzero(frame[names[-1]].isna().to_numpy())[0]) + 1
        raise DataError(path, names[-1], f"{len(names)} fields per line", f"fewer on line {bad}")
    return frame


def to_int(frame: pd.DataFrame, column: str, path: Path, nonnegative: bool = True) -> np.ndarray:
    """Parses an integer column; names file, column and first bad row on failure."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(path, column, "integers", f"{frame[column].iloc[row]!r} on row {row + 1}")
    result = values.to_numpy(dtype=np.float64)
    if np.any(result != np.floor(result)):
        row = int(np.flatnonzero(result != np.floor(result))[0])
        raise DataError(path, column, "integers", f"{result[row]!r} on row {row + 1}")
    if nonnegative and np.any(result < 0):
        row = int(np.flatnonzero(result < 0)[0])
        raise DataError(path, column, "non-negative ids", f"{int(result[row])} on row {row + 1}")
    return result.astype(np.int64)


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


def year_bucket(years: pd.Series) -> pd.Series:
    """Release decade ('1990s'); unknown years stay empty and are dropped."""
    decade = (pd.to_numeric(years, errors="coerce") // 10 * 10).astype("Int64")
    return decade.astype(str).where(decade.notna(), "").map(lambda s: f"{s}s" if s else "")


def title_year(titles: pd.Series) -> pd.Series:
    return titles.str.extract(r"\((\d{4})\)\s*$", expand=False)


def age_bucket(ages: np.ndarray) -> np.ndarray:
    return ML_AGE_BUCKETS[np.searchsorted(ML_AGE_BUCKETS, ages, side="right") - 1]


def user_feature_rows(users: pd.DataFrame, gender: str, age: str, occupation: str, zipcode: str,
                      ages_are_buckets: bool, path: Path) -> pd.DataFrame:
    ages = to_int(users, age, path)
    if not ages_are_buckets:
        ages = age_bucket(ages)
    zip_prefix = users[zipcode].str.slice(0, 2)
    return concat_features("user", [
        long_form("user", users["user"], "u_gender", users[gender]),
        long_form("user", users["user"], "u_age", pd.Series(ages)),
        long_form("user", users["user"], "u_occupation", users[occupation]),
        long_form("user", users["user"], "u_zip", zip_prefix),
    ])


def events_frame(users: pd.Series, items: pd.Series, ts: np.ndarray, rating: np.ndarray | None) -> pd.DataFrame:
    return pd.DataFrame({
        "user": users.astype(str).to_numpy(),
        "item": items.astype(str).to_numpy(),
        "ts": np.asarray(ts, dtype=np.int64),
        "rating": np.full(len(users), np.nan) if rating is None else np.asarray(rating, dtype=np.float64),
    })


def movies_features(movies: pd.DataFrame, genre_sep: str = "|") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Genres (multi-valued) and release decade from a movies table with item, title, genres."""
    features = concat_features("item", [
        long_form("item", movies["item"], "i_genre", movies["genres"], sep=genre_sep),
        long_form("item", movies["item"], "i_decade", year_bucket(title_year(movies["title"]))),
    ])
    features = features[~((features["feature"] == "i_genre") & (features["value"] == "(no genres listed)"))]
    return features, movies[["item", "title"]].astype(str)


def read_movielens(directory: str | Path) -> RawData:
    """Detects the MovieLens layout (100K, 1M/10M, 20M/25M/latest, or the sequence copy of 1M)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, None, "a MovieLens directory", "no such directory")
    if (directory / "u.data").exists():
        return read_ml100k(directory)
    if (directory / "ratings.dat").exists():
        return read_ml_dat(directory)
    if (directory / "ratings.csv").exists():
        return read_ml_csv(directory)
    for name in ("sequences.txt.gz", "sequences.txt"):
        if (directory / name).exists():
            optional = {k: directory / f for k, f in (("movies", "movies.dat"), ("users", "users.dat"))
                        if (directory / f).exists()}
            return read_sequences(directory / name, **optional)
    raise DataError(directory, None, "u.data, ratings.dat, ratings.csv or sequences.txt[.gz]", "none of them")


def read_ml100k(directory: Path) -> RawData:
    data_path = directory / "u.data"
    ratings = read_delimited(data_path, "\t", ["user", "item", "rating", "ts"])
    events = events_frame(ratings["user"], ratings["item"], to_int(ratings, "ts", data_path),
                          to_int(ratings, "rating", data_path))
    item_path = directory / "u.item"
    movies = read_delimited(item_path, "|", ["item", "title", "release", "video", "url", *ML100K_GENRES])
    flags = movies[ML100K_GENRES].to_numpy() == "1"
    rows, cols = np.nonzero(flags)
    genres = pd.DataFrame({"item": movies["item"].to_numpy()[rows], "feature": "i_genre",
                           "value": np.array(ML100K_GENRES)[cols]})
    release_year = movies["release"].str.slice(-4)
    item_features = concat_features("item", [genres, long_form("item", movies["item"], "i_decade",
                                                                year_bucket(release_year))])
    user_path = directory / "u.user"
    users = read_delimited(user_path, "|", ["user", "age", "gender", "occupation", "zip"])
    return RawData(
        events=events, item_features=item_features,
        user_features=user_feature_rows(users, "gender", "age", "occupation", "zip", False, user_path),
        titles=movies[["item", "title"]].astype(str), multi_valued={"i_genre"},
        files=[data_path, item_path, user_path], has_time=True,
        origin={"user": f"{data_path}:user", "item": f"{data_path}:item", "ts": f"{data_path}:ts"},
    )


def read_ml_dat(directory: Path) -> RawData:
    data_path = directory / "ratings.dat"
    ratings = read_delimited(data_path, "::", ["user", "item", "rating", "ts"])
    events = events_frame(ratings["user"], ratings["item"], to_int(ratings, "ts", data_path),
                          pd.to_numeric(ratings["rating"], errors="coerce").to_numpy())
    files = [data_path]
    item_features, titles, user_features = empty_features("item"), None, empty_features("user")
    if (directory / "movies.dat").exists():
        movies = read_delimited(directory / "movies.dat", "::", ["item", "title", "genres"])
        item_features, titles = movies_features(movies)
        files.append(directory / "movies.dat")
    if (directory / "users.dat").exists():
        user_path = directory / "users.dat"
        users = read_delimited(user_path, "::", ["user", "gender", "age", "occupation", "zip"])
        user_features = user_feature_rows(users, "gender", "age", "occupation", "zip", True, user_path)
        files.append(user_path)
    return RawData(events, item_features, user_features,
                   titles if titles is not None else pd.DataFrame({"item": [], "title": []}),
                   {"i_genre"}, files, True,
                   {"user": f"{data_path}:user", "item": f"{data_path}:item", "ts": f"{data_path}:ts"})


def read_ml_csv(directory: Path) -> RawData:
    data_path = directory / "ratings.csv"
    return read_interactions(data_path, user_col="userId", item_col="movieId", time_col="timestamp",
                             rating_col="rating", movies=directory / "movies.csv")


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Reads CSV or Parquet as Arrow; corrupt files and missing columns become DataErrors."""
    path = require_file(path)
    try:
        if path.suffix in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as err:
        kind = "Parquet" if path.suffix in (".parquet", ".pq") else "CSV"
        raise DataError(path, None, f"a valid {kind} file", str(err).splitlines()[0]) from err
    if table.num_rows == 0:
        raise DataError(path, None, "at least one row", "no rows")
    for column in columns or []:
        if column not in table.column_names:
            raise DataError(path, column, "a column with this name (set it with the matching --*-col flag)",
                            f"columns {table.column_names}")
    return table


def id_column(table: pa.Table, column: str, path: Path) -> pd.Series:
    """Ids may be integers or strings; nulls, negatives and other types are errors."""
    array = table.column(column)
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, column, "no nulls", f"{array.null_count} nulls, the first on row {row + 1}")
    if pa.types.is_integer(array.type):
        values = array.to_numpy()
        if np.any(values < 0):
            row = int(np.flatnonzero(values < 0)[0])
            raise DataError(path, column, "non-negative ids", f"{int(values[row])} on row {row + 1}")
        return pd.Series(values).astype(str)
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return pd.Series(array.to_pandas()).astype(str)
    raise DataError(path, column, "integer or string ids", f"type {array.type}")


def time_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    array = table.column(column)
    if array.null_count:
        row = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, column, "no nulls", f"{array.null_count} nulls, the first on row {row + 1}")
    if pa.types.is_timestamp(array.type) or pa.types.is_date(array.type):
        return array.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
    if pa.types.is_integer(array.type):
        return array.to_numpy().astype(np.int64)
    if pa.types.is_floating(array.type):
        return array.to_numpy().astype(np.int64)
    raise DataError(path, column, "a numeric or timestamp column", f"type {array.type}")


def numeric_column(table: pa.Table, column: str, path: Path) -> np.ndarray:
    array = table.column(column)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise DataError(path, column, "numbers", f"type {array.type}")
    if array.null_count:
        raise DataError(path, column, "no nulls", f"{array.null_count} nulls")
    return array.to_numpy().astype(np.float64)


def feature_table(path: Path, key_col: str, key: str, prefix: str, columns: list[str] | None,
                  skip: set[str], sep: str) -> tuple[pd.DataFrame, set[str], pd.DataFrame]:
    """Long-form features from a side table; list columns and `sep`-joined strings are multi-valued."""
    table = read_table(path, [key_col] + (columns or []))
    ids = id_column(table, key_col, path)
    names = columns or [c for c in table.column_names if c != key_col and c not in skip]
    parts, multi = [], set()
    for name in names:
        array = table.column(name)
        feature = prefix + re.sub(r"\W+", "_", name).lower()
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            multi.add(feature)
            lengths = array.combine_chunks().value_lengths().fill_null(0).to_numpy()
            values = pd.Series(pc_flatten(array)).astype(str)
            parts.append(pd.DataFrame({key: np.repeat(ids.to_numpy(), lengths), "feature": feature,
                                       "value": values.to_numpy()}))
            continue
        column = pd.Series(array.to_pandas())
        is_multi = not pd.api.types.is_numeric_dtype(column) and column.astype(str).str.contains(sep, regex=False).any()
        if is_multi:
            multi.add(feature)
        parts.append(long_form(key, ids, feature, column.where(column.notna(), ""),
                               sep=sep if is_multi else None))
    titles = pd.DataFrame({key: ids, "title": table.column("title").to_pandas().astype(str)}) \
        if "title" in table.column_names else pd.DataFrame({key: [], "title": []})
    return concat_features(key, parts), multi, titles


def pc_flatten(array: pa.ChunkedArray) -> np.ndarray:
    return array.combine_chunks().flatten().to_numpy(zero_copy_only=False)


def read_interactions(path: str | Path, user_col: str, item_col: str, time_col: str,
                      rating_col: str | None = None, item_features: str | Path | None = None,
                      user_features: str | Path | None = None, movies: str | Path | None = None,
                      feature_sep: str = "|") -> RawData:
    """A generic interactions table (CSV or Parquet) with optional item and user feature tables."""
    path = Path(path)
    table = read_table(path, [user_col, item_col, time_col] + ([rating_col] if rating_col else []))
    events = events_frame(id_column(table, user_col, path), id_column(table, item_col, path),
                          time_column(table, time_col, path),
                          numeric_column(table, rating_col, path) if rating_col else None)
    files, multi = [path], set()
    item_long, titles = empty_features("item"), pd.DataFrame({"item": [], "title": []})
    user_long = empty_features("user")
    if movies is not None and Path(movies).exists():
        frame = read_table(movies, [item_col, "title", "genres"]).to_pandas()
        frame = frame.rename(columns={item_col: "item"}).astype(str)
        item_long, titles = movies_features(frame)
        multi.add("i_genre")
        files.append(Path(movies))
    if item_features is not None:
        item_long, item_multi, titles = feature_table(Path(item_features), item_col, "item", "i_", None,
                                                      {"title"}, feature_sep)
        multi |= item_multi
        files.append(Path(item_features))
    if user_features is not None:
        user_long, user_multi, _ = feature_table(Path(user_features), user_col, "user", "u_", None, set(),
                                                 feature_sep)
        multi |= user_multi
        files.append(Path(user_features))
    return RawData(events, item_long, user_long, titles, multi, files, True,
                   {"user": f"{path}:{user_col}", "item": f"{path}:{item_col}", "ts": f"{path}:{time_col}"})


def read_sequences(path: str | Path, item_attributes: str | Path | None = None,
                   movies: str | Path | None = None, users: str | Path | None = None) -> RawData:
    """`user item1 item2 ...` per line, in time order (optionally gzipped); positions stand in for time."""
    path = require_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            lines = [line.split() for line in handle.read().splitlines()]
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(path, None, "a text file of 'user item item ...' lines", str(err)) from err
    lines = [tokens for tokens in lines if tokens]
    if not lines:
        raise DataError(path, None, "at least one 'user item ...' line", "no lines")
    lengths = np.array([len(tokens) - 1 for tokens in lines])
    if np.any(lengths < 1):
        row = int(np.flatnonzero(lengths < 1)[0])
        raise DataError(path, "items", "at least one item after the user id", f"none on line {row + 1}")
    user_ids = np.repeat(np.array([tokens[0] for tokens in lines]), lengths)
    item_ids = np.array([item for tokens in lines for item in tokens[1:]])
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(item_ids)) - starts
    events = events_frame(pd.Series(user_ids), pd.Series(item_ids), positions, None)
    files, multi = [path], set()
    item_long, titles = empty_features("item"), pd.DataFrame({"item": [], "title": []})
    user_long = empty_features("user")
    if item_attributes is not None:
        attr_path = require_file(item_attributes)
        try:
            mapping = json.loads(attr_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(attr_path, None, 'a JSON object {"item": [attribute, ...]}', str(err)) from err
        if not isinstance(mapping, dict):
            raise DataError(attr_path, None, 'a JSON object {"item": [attribute, ...]}', type(mapping).__name__)
        keys = list(mapping)
        counts = [len(v) if isinstance(v, list) else 1 for v in mapping.values()]
        values = [str(a) for v in mapping.values() for a in (v if isinstance(v, list) else [v])]
        item_long = pd.DataFrame({"item": np.repeat(np.array(keys, dtype=str), counts), "feature": "i_attr",
                                  "value": values})
        multi.add("i_attr")
        files.append(attr_path)
    if movies is not None:
        frame = read_delimited(Path(movies), "::", ["item", "title", "genres"])
        movie_long, titles = movies_features(frame)
        item_long = concat_features("item", [item_long, movie_long])
        multi.add("i_genre")
        files.append(Path(movies))
    if users is not None:
        user_path = Path(users)
        frame = read_delimited(user_path, "::", ["user", "gender", "age", "occupation", "zip"])
        user_long = user_feature_rows(frame, "gender", "age", "occupation", "zip", True, user_path)
        files.append(user_path)
    return RawData(events, item_long, user_long, titles, multi, files, False,
                   {"user": f"{path}:user", "item": f"{path}:items", "ts": f"{path}:position"})
