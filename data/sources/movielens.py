"""MovieLens, in every layout GroupLens ships, detected from the directory (local or on a store):

- 100K: `u.data` (tab-separated), `u.item`, `u.user` (`|`-separated, latin-1);
- 1M/10M: `ratings.dat`, `movies.dat`, `users.dat` (`::`-separated; 10M has no users.dat);
- 20M/25M/latest: `ratings.csv`, `movies.csv`;
- the sequence copy of 1M: `sequences.txt[.gz]` plus `movies.dat` and `users.dat`.

MovieLens ids are integers and ratings are 0.5-5 stars by definition: anything else is an error naming the
file, the line and the token. Events whose movie or user is missing from the side tables are kept, with a
warning.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data.errors import DataError
from data.sources.columns import Where, id_column, integer_tokens
from data.sources.files import delimited_table, read_small_table, require_file
from data.sources.interactions import read_interactions
from data.sources.raw import Coverage, Part, RawSource, concat_features, long_form, titles_table
from data.sources.sequences import read_sequences
from storage import Location, location

# Ages of MovieLens 1M (users.dat), reused to bucket the raw ages of MovieLens 100K.
ML_AGE_BUCKETS = np.array([1, 18, 25, 35, 45, 50, 56])
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]
NO_GENRE = "(no genres listed)"


def decades(years: pa.Array) -> pa.Array:
    """Release decade ('1990s') of 4-digit years; anything else becomes empty (dropped)."""
    digits = pc.match_substring_regex(pc.fill_null(years, ""), r"^\d{4}$")
    year = pc.cast(pc.if_else(digits, years, "0"), pa.int64()).to_numpy(zero_copy_only=False)
    text = np.char.add((year // 10 * 10).astype(str), "s")
    return pa.array(np.where(digits.to_numpy(zero_copy_only=False), text, ""), pa.string())


def title_years(titles: pa.Array) -> pa.Array:
    return pc.struct_field(pc.extract_regex(pc.fill_null(titles, ""), r"\((?P<year>\d{4})\)\s*$"), "year")


def movies_features(items: pa.Array, titles: pa.Array, genres: pa.Array) -> tuple[pa.Table, pa.Table]:
    """Genres (multi-valued) and release decade; and the titles."""
    genre = long_form(items, "i_genre", genres, sep="|")
    genre = genre.filter(pc.not_equal(genre.column("value"), NO_GENRE))
    decade = long_form(items, "i_decade", decades(pc.fill_null(title_years(titles), "")))
    return concat_features([genre, decade]), titles_table(items, titles)


def read_movies_dat(where: Location) -> tuple[pa.Table, pa.Table]:
    movies = delimited_table(where, "::", ["item", "title", "genres"])
    items = id_column(movies.column("item"), Where(str(where), 1), "item", pa.string(), integer=True)
    return movies_features(items, movies.column("title").combine_chunks(), movies.column("genres").combine_chunks())


def user_features(users: pa.Array, gender: pa.Array, ages: pa.Array, occupation: pa.Array,
                  zipcode: pa.Array) -> pa.Table:
    return concat_features([
        long_form(users, "u_gender", gender),
        long_form(users, "u_age", ages),
        long_form(users, "u_occupation", occupation),
        long_form(users, "u_zip", pc.utf8_slice_codeunits(pc.cast(zipcode, pa.string()), 0, 2)),
    ])


def read_users_dat(where: Location) -> pa.Table:
    frame = delimited_table(where, "::", ["user", "gender", "age", "occupation", "zip"])
    at = Where(str(where), 1)
    users = id_column(frame.column("user"), at, "user", pa.string(), integer=True)
    ages = integer_tokens(frame.column("age"), at, "age", "ages (integers)")
    return user_features(users, frame.column("gender").combine_chunks(), ages,
                         frame.column("occupation").combine_chunks(), frame.column("zip").combine_chunks())


def with_side_tables(source: RawSource, movies: Location | None, users: Location | None,
                     required: bool = False) -> RawSource:
    """Adds movies.dat titles and features and users.dat features, warning about events whose ids they do not
    list (and, when `required`, about a missing movies.dat)."""
    if movies is not None and movies.is_file():
        features, titles = read_movies_dat(movies)
        source.item_features = concat_features([source.item_features, features])
        source.titles = titles
        source.multi_valued.add("i_genre")
        source.files.append(movies.uri)
        source.coverage.append(Coverage("item", movies.uri, titles.column("item").combine_chunks()))
    elif required and movies is not None:
        source.coverage.append(Coverage("item", movies.uri, None))
    if users is not None and users.is_file():
        features = read_users_dat(users)
        source.user_features = concat_features([source.user_features, features])
        source.files.append(users.uri)
        source.coverage.append(Coverage("user", users.uri, pc.unique(features.column("key").combine_chunks())))
    return source


def read_movielens(directory: str) -> RawSource:
    """Detects the MovieLens layout (100K, 1M/10M, 20M/25M/latest, or the sequence copy of 1M)."""
    where = location(directory)
    if not where.is_dir():
        raise DataError(where, None, "a MovieLens directory", "no such directory")
    if (where / "u.data").exists():
        return read_ml100k(where)
    if (where / "ratings.dat").exists():
        return with_side_tables(ratings_events(where / "ratings.dat", "::"), where / "movies.dat",
                                where / "users.dat", required=True)
    if (where / "ratings.csv").exists():
        return read_ml_csv(where)
    for name in ("sequences.txt.gz", "sequences.txt"):
        if (where / name).exists():
            return with_side_tables(read_sequences(str(where / name)), where / "movies.dat", where / "users.dat")
    raise DataError(where, None, "u.data, ratings.dat, ratings.csv or sequences.txt[.gz]", "none of them")


def ratings_events(path: Location, sep: str) -> RawSource:
    """`user sep item sep rating sep timestamp` lines, all fields strictly checked."""
    require_file(path)
    part = Part(0, path.uri, "delimited", (("encoding", "latin-1"), ("sep", sep)))
    return RawSource("movielens", [part], pa.int64(), pa.int64(), has_time=True, has_rating=True,
                     origin={"user": f"{path}:user", "item": f"{path}:item", "ts": f"{path}:ts"}, files=[path.uri])


def age_bucket(ages: np.ndarray) -> np.ndarray:
    return ML_AGE_BUCKETS[np.searchsorted(ML_AGE_BUCKETS, ages, side="right") - 1]


def read_ml100k(directory: Location) -> RawSource:
    source = ratings_events(directory / "u.data", "\t")
    item_path = directory / "u.item"
    movies = delimited_table(item_path, "|", ["item", "title", "release", "video", "url", *ML100K_GENRES])
    items = id_column(movies.column("item"), Where(str(item_path), 1), "item", pa.string(), integer=True)
    genre_parts = []
    for genre in ML100K_GENRES:
        flagged = pc.equal(movies.column(genre).combine_chunks(), "1")
        keys = pc.filter(items, flagged)
        genre_parts.append(long_form(keys, "i_genre", pa.array([genre] * len(keys), pa.string())))
    releases = movies.column("release").combine_chunks()
    years = pc.utf8_slice_codeunits(releases, -4)
    source.item_features = concat_features(genre_parts + [long_form(items, "i_decade", decades(years))])
    source.titles = titles_table(items, movies.column("title").combine_chunks())
    source.multi_valued = {"i_genre"}
    user_path = directory / "u.user"
    users = delimited_table(user_path, "|", ["user", "age", "gender", "occupation", "zip"])
    at = Where(str(user_path), 1)
    user_ids = id_column(users.column("user"), at, "user", pa.string(), integer=True)
    ages = age_bucket(integer_tokens(users.column("age"), at, "age", "ages (integers)").to_numpy())
    source.user_features = user_features(user_ids, users.column("gender").combine_chunks(), pa.array(ages),
                                         users.column("occupation").combine_chunks(),
                                         users.column("zip").combine_chunks())
    source.files += [item_path.uri, user_path.uri]
    source.coverage += [Coverage("item", item_path.uri, items), Coverage("user", user_path.uri, user_ids)]
    return source


def read_ml_csv(directory: Location) -> RawSource:
    """20M/25M/latest: the generic reader with integer ids and star ratings, plus movies.csv."""
    source = read_interactions(str(directory / "ratings.csv"), user_col="userId", item_col="movieId",
                               time_col="timestamp", rating_col="rating", integer_ids=True, stars=True)
    source.kind = "movielens"
    movies_path = directory / "movies.csv"
    if movies_path.is_file():
        movies = read_small_table(movies_path, string_columns=["movieId"], wanted=["movieId", "title", "genres"])
        items = id_column(movies.column("movieId"), Where(str(movies_path), 2), "movieId", pa.string(), integer=True)
        features, titles = movies_features(items, movies.column("title").combine_chunks(),
                                           movies.column("genres").combine_chunks())
        source.item_features, source.titles = features, titles
        source.multi_valued.add("i_genre")
        source.files.append(movies_path.uri)
        source.coverage.append(Coverage("item", movies_path.uri, items))
    else:
        source.coverage.append(Coverage("item", movies_path.uri, None))
    return source
