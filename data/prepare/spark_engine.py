"""Apache Spark, for logs that outgrow one machine: the same plan, run by Spark SQL on a cluster (`--master
spark://...`, `yarn`, `k8s://...`) or `local[*]`, or by `spark-submit` of `python -m data.prepare`.

Spark reads and writes through the project's own storage layer, inside its Python tasks: raw parts are read
by the part readers (one task per part) and every output file is written by `PartWriter` from the task that
holds its rows. So a store needs no Hadoop connector (no `s3a://` jars): executors reach it with `pyarrow.fs`
and the standard environment (`AWS_*`, `GOOGLE_*`), which must be set on them too. Executors need this
project and its Python requirements; a non-local master is sent the project's packages with `addPyFile`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import pyarrow as pa

from data.errors import DataError
from data.prepare.builders import Shape, build, output_schema
from data.prepare.dialect import SPARK
from data.prepare.engine import Engine, Output, PartWriter, Written
from data.sources.raw import RawSource
from storage import StorageError, location
from storage.commit import Staging

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("config", "data", "storage")  # the packages executors import
LOCAL_DRIVER_MEMORY = 0.25  # of this machine's memory: a local master's driver JVM runs every task in its heap
ERROR_MARK = "two-tower-error:"  # an executor's one-line error, found again in Spark's exception text
WRITTEN = "name string, size long, sha256 string, rows long, values long"


def spark_type(kind: pa.DataType) -> str:
    return "bigint" if pa.types.is_integer(kind) else "string"


def one_line(err: Exception) -> RuntimeError:
    """An executor-side error that Spark passes back as text: marked, so the driver can name it in one line."""
    return RuntimeError(f"{ERROR_MARK}{type(err).__name__}:{err}")


def read_parts(parts: list) -> Callable:
    """The mapInArrow function that reads the parts whose indices arrive in its input."""
    from data.sources.parts import read_part

    by_index = {p.index: p for p in parts}

    def read(batches):
        for batch in batches:
            for index in batch.column(0).to_pylist():
                try:
                    yield from read_part(by_index[index])
                except (DataError, StorageError) as err:
                    raise one_line(err) from None

    return read


def write_parts(staging_uri: str, output: Output) -> Callable:
    """The mapInArrow function that writes its partition's rows, which arrive sorted by (bucket, order), into one
    file per bucket, and returns (name, size, sha256, rows) of each."""

    def write(batches):
        staging = location(staging_uri)
        writer, current = None, None
        try:
            for batch in batches:
                buckets = batch.column("_bucket").to_numpy() if output.files > 1 else None
                start = 0
                while start < batch.num_rows:
                    bucket = int(buckets[start]) if buckets is not None else 0
                    stop = start + 1
                    if buckets is not None:
                        while stop < batch.num_rows and buckets[stop] == bucket:
                            stop += 1
                    else:
                        stop = batch.num_rows
                    if bucket != current:
                        if writer is not None:
                            yield result(writer.close())
                        name = output.file(bucket)
                        writer, current = PartWriter(staging / name, name, output.count), bucket
                    writer.write(batch.slice(start, stop - start))
                    start = stop
            if writer is not None:
                yield result(writer.close())
        except (DataError, StorageError) as err:
            raise one_line(err) from None

    return write


def built_rows(kind: str, shape: Shape, events: pa.Table, side: pa.Table) -> pa.Table:
    """A cogroup's rows: builders.build on the group's events and users (the grouping column dropped)."""
    try:
        return build(kind, shape, events.drop_columns(["_group"]), side.drop_columns(["_group"]))
    except (DataError, StorageError) as err:
        raise one_line(err) from None


def spark_schema(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} {'array<bigint>' if pa.types.is_list(f.type) else 'bigint'}" for f in schema)


def result(entry: tuple) -> pa.RecordBatch:
    name, size, sha256, rows, values = entry
    return pa.RecordBatch.from_pydict({"name": [name], "size": [size], "sha256": [sha256], "rows": [rows],
                                       "values": [values]})


def hash_file(uri: str) -> tuple[str, str]:
    return uri, location(uri).sha256()[1]


def project_zip(directory: str) -> str:
    path = os.path.join(directory, "two_tower_packages.zip")
    with zipfile.ZipFile(path, "w") as archive:
        for package in SHIPPED:
            for file in (ROOT / package).rglob("*.py"):
                archive.write(file, file.relative_to(ROOT))
    return path


def local_driver_memory() -> str:
    """LOCAL_DRIVER_MEMORY of this machine's memory, at least Spark's own 1 GB default."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{max(1024, int(total * LOCAL_DRIVER_MEMORY) >> 20)}m"


class SparkEngine(Engine):
    dialect = SPARK

    def __init__(self, master: str = "", conf: dict[str, str] | None = None):
        """`master`: as given; else spark-submit's when it started this process, else local[*]."""
        from pyspark.sql import SparkSession

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        active = SparkSession.getActiveSession()
        builder = SparkSession.builder.appName("two-tower prepare")
        submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit passes its master through its own conf
        master = master or ("" if submitted else "local[*]")
        if active is None and master:
            builder = builder.master(master)
        # A cogroup of the events and users tables, which share their lineage (the vocabularies), trips Spark's
        # self-join check although every column is named without ambiguity.
        settings = {"spark.ui.showConsoleProgress": "false", "spark.sql.execution.arrow.pyspark.enabled": "true",
                    "spark.sql.session.timeZone": "UTC", "spark.sql.analyzer.failAmbiguousSelfJoin": "false"}
        if master.startswith("local"):  # Spark's 200 shuffle partitions are for clusters; on one machine they cost
            settings["spark.sql.shuffle.partitions"] = str(2 * (os.cpu_count() or 1))
            # With Spark's default 1 GB heap the JVM failed at 10^8 events (bench/prepare.py): a local master's
            # driver is its only executor, so it gets a share of the machine (--spark-conf spark.driver.memory wins).
            settings["spark.driver.memory"] = local_driver_memory()
        settings.update(conf or {})
        for key, value in settings.items():
            builder = builder.config(key, value)
        self.started = active is None
        self.spark = builder.getOrCreate()
        self.spark.sparkContext.setLogLevel("ERROR")
        self.tmp = tempfile.mkdtemp(prefix="two-tower-spark-")
        if not self.spark.sparkContext.master.startswith("local"):
            self.spark.sparkContext.addPyFile(project_zip(self.tmp))
        self.cached: dict[str, object] = {}

    def run(self, action):
        """Runs a Spark action; an executor's DataError or StorageError comes back as the same one-line error."""
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - Py4J and PySpark wrap executor failures in several types
            found = re.search(re.escape(ERROR_MARK) + r"(\w+):(.*)", str(err))
            if not found:
                raise
            kind, message = found.group(1), found.group(2).strip()
            if kind in ("StorageError", "MissingError", "CommitError"):
                uri, _, problem = message.partition(": ")
                raise StorageError(uri, problem) from None
            raise DataError.verbatim(message) from None

    def load_events(self, source: RawSource) -> None:
        ddl = f"user {spark_type(source.user_type)}, item {spark_type(source.item_type)}, ts bigint, rating double, " \
              f"src bigint"
        if source.events is not None:
            frame = self.spark.createDataFrame(source.events)
        else:
            indices = self.spark.createDataFrame([(p.index,) for p in source.parts], "part int")
            indices = indices.repartition(max(1, len(source.parts)))
            frame = indices.mapInArrow(read_parts(source.parts), ddl)
        self.materialise("raw_events", frame)

    def materialise(self, name: str, frame) -> None:
        """Computed once and kept on the executors (memory, then disk), with its lineage cut."""
        frame = self.run(lambda: frame.localCheckpoint(eager=True))
        frame.createOrReplaceTempView(name)
        self.cached[name] = frame

    def load_arrow(self, name: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            schema = ", ".join(f"{f.name} {'bigint' if pa.types.is_integer(f.type) else 'string'}"
                               for f in table.schema)
            frame = self.spark.createDataFrame([], schema)
        else:
            frame = self.spark.createDataFrame(table)
        frame.createOrReplaceTempView(name)

    def create(self, name: str, sql: str, order: tuple[str, ...] = ()) -> None:
        """`order` is not kept: Spark's partitions gain nothing from a global sort."""
        self.materialise(name, self.spark.sql(sql))

    def drop(self, *names: str) -> None:
        for name in names:
            frame = self.cached.pop(name, None)
            if frame is not None:
                frame.unpersist()
            self.spark.catalog.dropTempView(name)

    def rows(self, sql: str) -> list[tuple]:
        return [tuple(row) for row in self.run(lambda: self.spark.sql(sql).collect())]

    def write(self, sql: str, output: Output, staging: Staging) -> Written:
        return self.write_frame(self.spark.sql(sql), output, staging)

    def write_built(self, kind: str, shape: Shape, events_sql: str, side_sql: str, output: Output, staging: Staging,
                    groups: int) -> Written:
        """Each group's events and users' rows meet in one task (a cogroup), which builds its rows there."""
        group = self.dialect.idiv(f"(user - 1) * {groups}", str(max(shape.users, 1)))
        events = self.spark.sql(f"SELECT *, {group} AS _group FROM ({events_sql}) e")
        side = self.spark.sql(f"SELECT *, {group} AS _group FROM ({side_sql}) s")
        built = events.groupBy("_group").cogroup(side.groupBy("_group")).applyInArrow(
            functools.partial(built_rows, kind, shape), spark_schema(output_schema(kind, shape)))
        return self.write_frame(built, output, staging)

    def write_frame(self, frame, output: Output, staging: Staging) -> Written:
        """Rows to parts by `_bucket` (one file per bucket), each sorted by `output.order`, written from the tasks."""
        if output.files > 1:
            frame = frame.repartition(output.files, "_bucket").sortWithinPartitions("_bucket", *output.order)
        else:
            frame = frame.repartition(1).sortWithinPartitions(*output.order)
        entries = self.run(lambda: frame.mapInArrow(write_parts(staging.location.uri, output), WRITTEN).collect())
        written = Written([])
        for entry in sorted(entries, key=lambda e: e["name"]):
            staging.record(entry["name"], entry["size"], entry["sha256"])
            written.add(entry["name"], entry["rows"], entry["values"])
        return written

    def checksums(self, uris: list[str]) -> list[dict]:
        if not uris:
            return []
        pairs = self.run(lambda: self.spark.sparkContext.parallelize(uris, len(uris)).map(hash_file).collect())
        digests = dict(pairs)
        return [{"path": uri, "sha256": digests[uri]} for uri in uris]

    def close(self) -> None:
        for name in list(self.cached):
            self.drop(name)
        if self.started:
            from pyspark import SparkContext

            gateway = SparkContext._gateway
            self.spark.stop()
            if gateway is not None:  # the JVM this session started goes too (stop() alone leaves it running)
                gateway.shutdown()
                process = getattr(gateway, "proc", None)
                if process is not None:
                    process.terminate()
                    process.wait()
                SparkContext._gateway = SparkContext._jvm = None
        shutil.rmtree(self.tmp, ignore_errors=True)
