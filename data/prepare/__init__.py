"""Raw source -> prepared Parquet layout (data/schema.py), on local disk or an object store.

    python -m data.prepare movielens ../shared/datasets/ml-1m --out prepared/ml-1m
    python -m data.prepare interactions s3://logs/clicks/ --user-col u --item-col i --time-col t --out s3://...
    python -m data.prepare interactions events/ ... --engine spark --master spark://host:7077 --out ...

One plan (plan.py) runs on two engines: the embedded DuckDB engine (default: bounded memory, no server) and
Apache Spark (`--engine spark`). The output is committed with a manifest written last (storage/commit.py), so
a failure never leaves a dataset that looks complete.
"""

from __future__ import annotations

import sys
from typing import Callable

from data import schema
from data.errors import DataError
from data.prepare.engine import Engine
from data.prepare.plan import CONTEXT_VOCABS, Plan
from data.sources.raw import RawSource
from data.splits import SplitConfig
from storage import Location, location
from storage.commit import read_manifest, writing

ENGINES = ("duckdb", "spark")
DEFAULT_MEMORY = "384MB"  # the embedded engine's memory before it spills to disk

__all__ = ["CONTEXT_VOCABS", "DEFAULT_MEMORY", "ENGINES", "check_output", "make_engine", "prepare"]


def make_engine(name: str = "duckdb", master: str = "", memory_limit: str = "", threads: int = 0,
                temp_dir: str = "", spark_conf: dict[str, str] | None = None) -> Engine:
    if name == "duckdb":
        from data.prepare.duckdb_engine import DuckDBEngine

        return DuckDBEngine(memory_limit or DEFAULT_MEMORY, threads, temp_dir)
    if name == "spark":
        try:
            from data.prepare.spark_engine import SparkEngine
        except ImportError as err:
            raise DataError("--engine spark", None, "pyspark installed (pip install '.[spark]') and Java 17+",
                            str(err)) from None
        return SparkEngine(master, spark_conf)
    raise DataError("--engine", None, f"one of {ENGINES}", repr(name))


def check_output(out: Location, overwrite: bool) -> None:
    """`--out` must be new, empty, or a dataset to replace with --overwrite (or an incomplete earlier write)."""
    if out.is_file():
        raise DataError(out, None, "a directory to write the prepared dataset into (--out)", "an existing file")
    if out.is_local and out.parent.is_file():
        raise DataError(out.parent, None, "a directory to hold --out", "an existing file")
    if not overwrite and out.files() and read_manifest(out) is not None:
        raise DataError(out, None, "a new or empty output directory (or pass --overwrite)", "a prepared dataset")
    if not overwrite and out.files() and out.is_local:
        raise DataError(out, None, "a new or empty output directory (or pass --overwrite)", "it has files")


def prepare(source: RawSource, cfg: SplitConfig, out: "str | Location", seed: int = 0, overwrite: bool = False,
            engine: Engine | None = None, info: dict | None = None,
            warn: Callable[[str], None] | None = None) -> schema.Metadata:
    """Prepares `source` into `out`, committed at the end; nothing that looks complete is left on failure.
    Warnings (side tables that miss ids of the events) go to `warn` (stderr by default)."""
    out = location(out)
    check_output(out, overwrite)
    owned = engine is None
    engine = engine or make_engine()
    try:
        with writing(out, schema.KIND) as staging:
            plan = Plan(engine, source, cfg, seed, staging, info or {"kind": source.kind})
            metadata = plan.run()
    finally:
        if owned:
            engine.close()
    for warning in plan.warnings:
        (warn or (lambda text: print(f"warning: {text}", file=sys.stderr)))(warning)
    return metadata
