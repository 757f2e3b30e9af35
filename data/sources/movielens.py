"""MovieLens, in every layout GroupLens ships, detected from the directory:

- 100K: `u.data` (tab-separated), `u.item`, `u.user` (`|`-separated, latin-1);
- 1M/10M: `ratings.dat`, `movies.dat`, `users.dat` (`::`-separated; 10M has no users.dat);
- 20M/25M/latest: `ratings.csv`, `movies.csv`;
- the sequence copy of 1M: `sequences.txt[.gz]` plus `movies.dat` and `users.dat`.

MovieLens ids are integers and ratings are 0.5-5 stars by definition: anything else is an error
naming the file, the line and the token. Events whose movie or user is missing from the side
tables are kept, with a warning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data.errors import DataError
from data.sources.columns import id_column, integer_tokens, read_delimited, read_table, star_ratings
from data.sources.interactions import read_interactions
from data.sources.raw import RawData, concat_features, coverage_warning, events_frame, long_form, no_titles
from data.sources.sequences import read_sequences

# Ages of MovieLens 1M (users.dat), reused to bucket the raw ages of MovieLens 100K.
ML_AGE_BUCKETS = np.array([1, 18, 25, 35, 45, 50, 56])
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]
NO_GENRE = "(no genres listed)"


def year_bucket(years: pd.Series) -> pd.Series:
    """Release decade ('1990s'); unknown years stay empty and are dropped."""
    decade = (pd.to_numeric(years, errors="coerce") // 10 * 10).astype("Int64")
    return decade.astype(str).where(decade.notna(), "").map(lambda s: f"{s}s" if s else "")


def title_year(titles: pd.Series) -> pd.Series:
    return titles.str.extract(r"\((\d{4})\)\s*$", expand=False)


def age_bucket(ages: np.ndarray) -> np.ndarray:
    return ML_AGE_BUCKETS[np.searchsorted(ML_AGE_BUCKETS, ages, side="right") - 1]


def movies_features(items: pd.Series, titles: pd.Series, genres: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Genres (multi-valued) and release decade; and the titles."""
    features = concat_features("item", [
        long_form("item", items, "i_genre", genres, sep="|"),
        long_form("item", items, "i_decade", year_bucket(title_year(titles))),
    ])
    features = features[~((features["feature"] == "i_genre") & (features["value"] == NO_GENRE))]
    return features, pd.DataFrame({"item": items.astype(str).to_numpy(), "title": titles.astype(str).to_numpy()})


def read_movies_dat(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    movies = read_delimited(path, "::", ["item", "title", "genres"])
    items = pd.Series(integer_tokens(movies["item"], path, "item", 1)).astype(str)
    return movies_features(items, movies["title"], movies["genres"])


def user_features(users: pd.Series, gender: pd.Series, ages: np.ndarray, occupation: pd.Series,
                  zipcode: pd.Series) -> pd.DataFrame:
    return concat_features("user", [
        long_form("user", users, "u_gender", gender),
        long_form("user", users, "u_age", pd.Series(ages)),
        long_form("user", users, "u_occupation", occupation),
        long_form("user", users, "u_zip", zipcode.str.slice(0, 2)),
    ])


def read_users_dat(path: Path) -> pd.DataFrame:
    frame = read_delimited(path, "::", ["user", "gender", "age", "occupation", "zip"])
    users = pd.Series(integer_tokens(frame["user"], path, "user", 1)).astype(str)
    ages = integer_tokens(frame["age"], path, "age", 1, "ages (integers)")
    return user_features(users, frame["gender"], ages, frame["occupation"], frame["zip"])


def with_side_tables(raw: RawData, movies: Path | None, users: Path | None, required: bool = False) -> RawData:
    """Adds movies.dat titles and features and users.dat features to `raw`, warning about events
    whose ids they do not list (and, when `required`, about a missing file)."""
    if movies is not None and movies.is_file():
        features, titles = read_movies_dat(movies)
        raw.item_features = concat_features("item", [raw.item_features, features])
        raw.titles = titles
        raw.multi_valued.add("i_genre")
        raw.files.append(movies)
        raw.warnings.append(coverage_warning("item", raw.events["item"], titles["item"], movies))
    elif required and movies is not None:
        raw.warnings.append(coverage_warning("item", raw.events["item"], None, movies))
    if users is not None and users.is_file():
        features = read_users_dat(users)
        raw.user_features = concat_features("user", [raw.user_features, features])
        raw.files.append(users)
        raw.warnings.append(coverage_warning("user", raw.events["user"], features["user"].drop_duplicates(), users))
    raw.warnings = [w for w in raw.warnings if w]
    return raw


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
            return with_side_tables(read_sequences(directory / name), directory / "movies.dat",
                                    directory / "users.dat")
    raise DataError(directory, None, "u.data, ratings.dat, ratings.csv or sequences.txt[.gz]", "none of them")


def ratings_events(path: Path, sep: str) -> RawData:
    """`user sep item sep rating sep timestamp` lines, all fields strictly checked."""
    ratings = read_delimited(path, sep, ["user", "item", "rating", "ts"])
    events = events_frame(integer_tokens(ratings["user"], path, "user", 1),
                          integer_tokens(ratings["item"], path, "item", 1),
                          integer_tokens(ratings["ts"], path, "ts", 1, "integer unix timestamps"),
                          star_ratings(ratings["rating"], path, "rating", 1))
    return RawData(events, concat_features("item", []), concat_features("user", []), no_titles(), set(), [path],
                   True, {"user": f"{path}:user", "item": f"{path}:item", "ts": f"{path}:ts"})


def read_ml100k(directory: Path) -> RawData:
    raw = ratings_events(directory / "u.data", "\t")
    item_path = directory / "u.item"
    movies = read_delimited(item_path, "|", ["item", "title", "release", "video", "url", *ML100K_GENRES])
    items = pd.Series(integer_tokens(movies["item"], item_path, "item", 1)).astype(str)
    flags = movies[ML100K_GENRES].to_numpy() == "1"
    rows, cols = np.nonzero(flags)
    genres = pd.DataFrame({"item": items.to_numpy()[rows], "feature": "i_genre",
                           "value": np.array(ML100K_GENRES)[cols]})
    decades = long_form("item", items, "i_decade", year_bucket(movies["release"].str.slice(-4)))
    raw.item_features = concat_features("item", [genres, decades])
    raw.titles = pd.DataFrame({"item": items.to_numpy(), "title": movies["title"].to_numpy()})
    raw.multi_valued = {"i_genre"}
    user_path = directory / "u.user"
    users = read_delimited(user_path, "|", ["user", "age", "gender", "occupation", "zip"])
    user_ids = pd.Series(integer_tokens(users["user"], user_path, "user", 1)).astype(str)
    ages = age_bucket(integer_tokens(users["age"], user_path, "age", 1, "ages (integers)"))
    raw.user_features = user_features(user_ids, users["gender"], ages, users["occupation"], users["zip"])
    raw.files += [item_path, user_path]
    raw.warnings = [w for w in (coverage_warning("item", raw.events["item"], items, item_path),
                                coverage_warning("user", raw.events["user"], user_ids, user_path)) if w]
    return raw


def read_ml_dat(directory: Path) -> RawData:
    return with_side_tables(ratings_events(directory / "ratings.dat", "::"), directory / "movies.dat",
                            directory / "users.dat", required=True)


def read_ml_csv(directory: Path) -> RawData:
    """20M/25M/latest: the generic reader with integer ids and star ratings, plus movies.csv."""
    data_path = directory / "ratings.csv"
    raw = read_interactions(data_path, user_col="userId", item_col="movieId", time_col="timestamp",
                            rating_col="rating", integer_ids=True)
    star_ratings(raw.events["rating"], data_path, "rating", 2)
    movies_path = directory / "movies.csv"
    if movies_path.is_file():
        movies = read_table(movies_path, ["movieId", "title", "genres"], string_columns=["movieId"])
        items = id_column(movies, "movieId", movies_path, integer=True)
        features, titles = movies_features(items, pd.Series(movies.column("title").to_pandas()),
                                           pd.Series(movies.column("genres").to_pandas()))
        raw.item_features, raw.titles = features, titles
        raw.multi_valued.add("i_genre")
        raw.files.append(movies_path)
        raw.warnings.append(coverage_warning("item", raw.events["item"], items, movies_path))
    else:
        raw.warnings.append(coverage_warning("item", raw.events["item"], None, movies_path))
    raw.warnings = [w for w in raw.warnings if w]
    return raw
