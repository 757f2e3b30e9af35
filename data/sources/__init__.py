"""Readers for every raw source. Each one returns a `RawSource` (raw.py): its events as parts that stream into
the canonical event schema, and its side tables in long form, so one plan prepares them all.

- `movielens`: the MovieLens layouts (integer ids and a 0.5-5 star scale, by definition);
- `interactions`: a generic CSV/Parquet table, or a directory of parts, with optional feature tables;
- `sequences`: a `user item item ...` text file with an optional attribute JSON;
- `parts`: the part readers (run by the engine, in this process or on Spark's executors);
- `columns`, `files`: the validation and file access every reader shares.
"""

from data.sources.interactions import read_interactions
from data.sources.movielens import read_movielens, with_side_tables
from data.sources.raw import RawSource
from data.sources.sequences import read_sequences

__all__ = ["RawSource", "read_interactions", "read_movielens", "read_sequences", "with_side_tables"]
