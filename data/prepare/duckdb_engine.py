"""The embedded engine: DuckDB in this process, out of core (it spills to a temporary directory beyond its
memory limit), multi-threaded, no server.

Raw events stream in through the part readers, so DuckDB reads whatever storage `pyarrow.fs` reaches.
Parted outputs (training rows, sequences, queries) are written in two passes that keep memory bounded: the
rows go to local temporary files partitioned by part, then each part is sorted on its own and written
through storage.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import duckdb
import pyarrow as pa

from data.prepare.dialect import DUCKDB
from data.prepare.engine import Engine, Output, PartWriter
from data.sources.parts import read_part
from data.sources.raw import RawSource
from storage import location
from storage.commit import Staging

FETCH_ROWS = 16_384
DEFAULT_MEMORY = "512MB"


class DuckDBEngine(Engine):
    dialect = DUCKDB

    def __init__(self, memory_limit: str = DEFAULT_MEMORY, threads: int = 0, temp_dir: str = ""):
        self.tmp = tempfile.mkdtemp(prefix="two-tower-prepare-", dir=temp_dir or None)
        self.threads = threads or os.cpu_count() or 1
        self.con = duckdb.connect(":memory:", config={
            "memory_limit": memory_limit, "threads": self.threads, "temp_directory": os.path.join(self.tmp, "spill"),
            "preserve_insertion_order": False})
        self.registered: set[str] = set()

    def load_events(self, source: RawSource) -> None:
        failures: list[BaseException] = []

        def batches():
            try:
                for part in source.parts:
                    yield from read_part(part)
            except BaseException as err:  # DuckDB reports it as text; the reader's own error is the message
                failures.append(err)
                raise

        stream = source.events if source.events is not None else pa.RecordBatchReader.from_batches(source.schema,
                                                                                                   batches())
        self.con.register("raw_source", stream)
        try:
            self.con.execute("CREATE OR REPLACE TABLE raw_events AS SELECT * FROM raw_source")
        except duckdb.Error:
            if failures:
                raise failures[0] from None
            raise
        finally:
            self.con.unregister("raw_source")

    def load_arrow(self, name: str, table: pa.Table) -> None:
        self.con.register(f"{name}_arrow", table)
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM {name}_arrow")
        self.con.unregister(f"{name}_arrow")

    def create(self, name: str, sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {sql}")

    def drop(self, *names: str) -> None:
        for name in names:
            self.con.execute(f"DROP TABLE IF EXISTS {name}")

    def rows(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def write(self, sql: str, output: Output, staging: Staging) -> list[str]:
        order = ", ".join(output.order)
        if output.files == 1:
            written = [self.write_file(f"SELECT * FROM ({sql}) q ORDER BY {order}", staging, output.file(0))]
        else:
            parts = os.path.join(self.tmp, "parts")
            shutil.rmtree(parts, ignore_errors=True)
            self.con.execute(f"COPY ({sql}) TO '{parts}' (FORMAT parquet, PARTITION_BY (_bucket))")
            written = []
            for bucket in range(output.files):
                directory = os.path.join(parts, f"_bucket={bucket}")
                if os.path.isdir(directory):
                    query = f"SELECT * FROM read_parquet('{directory}/*.parquet') ORDER BY {order}"
                    written.append(self.write_file(query, staging, output.file(bucket)))
                    shutil.rmtree(directory)
        return written

    def write_file(self, query: str, staging: Staging, name: str) -> str:
        result = self.con.sql(query)
        writer = PartWriter(staging / name, name)
        reader = result.to_arrow_reader(FETCH_ROWS)
        for batch in reader:
            writer.write(batch)
        staging.record(*writer.close(reader.schema)[:3])
        return name

    def checksums(self, uris: list[str]) -> list[dict]:
        with ThreadPoolExecutor(self.threads) as pool:
            digests = list(pool.map(lambda uri: location(uri).sha256()[1], uris))
        return [{"path": uri, "sha256": digest} for uri, digest in zip(uris, digests)]

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
