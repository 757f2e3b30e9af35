"""Readers for every raw source. Each one returns the same `RawData`, so one code path prepares them all.

- `movielens`: the MovieLens layouts (integer ids and a 0.5-5 star scale, by definition);
- `interactions`: a generic CSV/Parquet table with optional item and user feature tables;
- `sequences`: a `user item item ...` text file with an optional attribute JSON;
- `columns`: the validation every reader shares (files, encodings, id, time and rating columns);
- `raw`: `RawData` and the long-form feature helpers.
"""

from data.sources.interactions import read_interactions
from data.sources.movielens import read_movielens
from data.sources.raw import RawData
from data.sources.sequences import read_sequences

__all__ = ["RawData", "read_interactions", "read_movielens", "read_sequences"]
