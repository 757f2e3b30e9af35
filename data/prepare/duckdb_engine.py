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
import numpy as np
import pyarrow as pa

from data.prepare.builders import Shape, build, user_ranges
from data.prepare.dialect import DUCKDB
from data.prepare.engine import Engine, Output, PartWriter, Written
from data.sources.parts import read_part
from data.sources.raw import RawSource
from storage import location
from storage.commit import Staging

FETCH_ROWS = 16_384
SPILL_BYTES = 64 << 20  # rows held in memory before the shuffle writes them to its bucket files
WRITERS = 2  # Parquet files encoded at once, beside the thread that builds the next


def write_table(table: pa.Table, staging: Staging, name: str, count: str = "") -> tuple | None:
    """The rows as one file of the layout: (name, rows, values counted); None (and no file) when there are none."""
    if table.num_rows == 0:
        return None
    writer = PartWriter(staging / name, name, count)
    for batch in table.to_batches(FETCH_ROWS):
        writer.write(batch)
    name, size, sha256, rows, values = writer.close()
    staging.record(name, size, sha256)
    return name, rows, values


class Spill:
    """Rows routed to local Arrow IPC files by their `_bucket`, buffered up to SPILL_BYTES in memory: the
    embedded engine's shuffle of the training rows over the parts, with bounded memory."""

    def __init__(self, directory: str, buckets: int):
        self.directory, self.buckets = directory, buckets
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        self.buffers: list[list[pa.Table]] = [[] for _ in range(buckets)]
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        self.buffered = 0
        self.schema: pa.Schema | None = None

    def add(self, rows: pa.Table) -> None:
        """Rows in `_bucket` order (builders.train_rows writes them so): each bucket's rows are a slice."""
        if not rows.num_rows:
            return
        self.schema = rows.schema
        buckets = rows.column("_bucket").to_numpy()
        if np.any(buckets[1:] < buckets[:-1]):
            raise ValueError("the shuffle's rows must come in _bucket order")
        bounds = np.searchsorted(buckets, np.arange(self.buckets + 1))
        for bucket in np.flatnonzero(np.diff(bounds)):
            self.buffers[bucket].append(rows.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))
        self.buffered += rows.nbytes
        if self.buffered > SPILL_BYTES:
            self.flush()

    def flush(self) -> None:
        for bucket, batches in enumerate(self.buffers):
            if not batches:
                continue
            if bucket not in self.writers:
                self.writers[bucket] = pa.ipc.new_file(os.path.join(self.directory, f"{bucket}.arrow"), self.schema)
            self.writers[bucket].write_table(pa.concat_tables(batches))
            self.buffers[bucket] = []
        self.buffered = 0

    def table(self, bucket: int) -> pa.Table | None:
        """The bucket's rows (read whole: a part's worth), or None when it has none."""
        if self.buffers[bucket] or bucket in self.writers:
            self.flush()
        if bucket not in self.writers:
            return None
        self.writers.pop(bucket).close()
        path = os.path.join(self.directory, f"{bucket}.arrow")
        with pa.memory_map(path) as source:
            table = pa.ipc.open_file(source).read_all()
        os.remove(path)
        return table

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class DuckDBEngine(Engine):
    dialect = DUCKDB

    def __init__(self, memory_limit: str, threads: int = 0, temp_dir: str = ""):
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

    def create(self, name: str, sql: str, order: tuple[str, ...] = ()) -> None:
        ordered = f" ORDER BY {', '.join(order)}" if order else ""
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS {sql}{ordered}")

    def drop(self, *names: str) -> None:
        for name in names:
            self.con.execute(f"DROP TABLE IF EXISTS {name}")

    def rows(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def write(self, sql: str, output: Output, staging: Staging) -> Written:
        """One file (catalogue-sized: items, users, id maps), streamed in order."""
        name = output.file(0)
        writer = PartWriter(staging / name, name, output.count)
        reader = self.con.sql(f"SELECT * FROM ({sql}) q ORDER BY {', '.join(output.order)}").to_arrow_reader(
            FETCH_ROWS)
        for batch in reader:
            if batch.num_rows:
                writer.write(batch)
        written = Written([])
        if writer.schema is not None:
            name, size, sha256, rows, values = writer.close()
            staging.record(name, size, sha256)
            written.add(name, rows, values)
        return written

    def write_built(self, kind: str, shape: Shape, events_sql: str, side_sql: str, output: Output, staging: Staging,
                    groups: int) -> Written:
        """Group by group: its rows are built, then written by a writer thread (the per-user parts) or routed to the
        training shuffle's bucket files, while DuckDB reads the next group. At most WRITERS files are written at
        once (each a part's worth of rows in memory)."""
        order = [(column, "ascending") for column in output.order]
        spill = None if output.by_chunk else Spill(os.path.join(self.tmp, "parts"), output.files)
        with ThreadPoolExecutor(WRITERS) as pool:
            pending: list = []

            def submit(table: pa.Table, name: str) -> None:
                if len(pending) >= WRITERS:
                    pending[-WRITERS].result()
                pending.append(pool.submit(write_table, table, staging, name, output.count))

            for chunk, (lo, hi) in enumerate(user_ranges(shape.users, groups)):
                where = f"WHERE user BETWEEN {lo} AND {hi}"
                events = self.con.sql(f"SELECT * FROM ({events_sql}) e {where}").to_arrow_table()
                side = self.con.sql(f"SELECT * FROM ({side_sql}) s {where}").to_arrow_table()
                rows = build(kind, shape, events, side)
                if spill is None:
                    submit(rows, output.file(chunk))
                else:
                    spill.add(rows)
            if spill is not None:
                for bucket in range(output.files):
                    table = spill.table(bucket)
                    if table is not None:
                        submit(table.sort_by(order), output.file(bucket))
                spill.close()
            written = Written([])
            for entry in (future.result() for future in pending):
                if entry:
                    written.add(*entry)
        return written

    def checksums(self, uris: list[str]) -> list[dict]:
        with ThreadPoolExecutor(self.threads) as pool:
            digests = list(pool.map(lambda uri: location(uri).sha256()[1], uris))
        return [{"path": uri, "sha256": digest} for uri, digest in zip(uris, digests)]

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
