"""Pipelined, rank-sharded Parquet loader: row groups -> shuffled Arrow tables -> KJT batches.

Guarantees (tested in tests/test_loader.py):
- every example is yielded exactly once per epoch across ranks, and every rank yields the same
  number of batches of the same size (the last batch is padded; padding rows have row_mask False);
- Arrow list offsets/values become KJT lengths/values with numpy only, never per-row Python;
- memory is bounded by the shuffle buffer and the prefetch queue, not by the dataset size;
- ids are validated per row group as they are read, so a bad id names its file and column and never
  reaches an FBGEMM kernel.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data import schema
from data.batch import ITEM_KEY, EvalBatch, TrainBatch, candidate_key, history_key
from data.errors import DataError
from data.ragged import gather_csr, gather_ragged, list_offsets_values, offsets_from_lengths
from data.sampler import NegativeSampler

SPLIT_FILES = {"valid": schema.VALID_FILE, "test": schema.TEST_FILE}


@dataclass
class LoaderConfig:
    batch_size: int = 1024
    num_negatives: int = 1024
    sampler: str = "unigram"  # "uniform" or "unigram" (freq ** unigram_alpha)
    unigram_alpha: float = 0.75
    history_bags: list[int] = field(default_factory=lambda: [1, 10, 0])  # last-k bags; 0 = whole history
    use_user_id: bool = False
    out_of_vocab: str = "error"  # "error", or "hash" (id modulo the vocabulary, for open vocabularies)
    shuffle_buffer: int = 65_536  # rows mixed across row groups before batching
    prefetch_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.num_negatives < 0 or self.shuffle_buffer < 1 or self.prefetch_batches < 1:
            raise ValueError("loader: batch_size, shuffle_buffer and prefetch_batches must be >= 1, "
                             "num_negatives >= 0")
        if self.sampler not in ("uniform", "unigram"):
            raise ValueError(f"loader.sampler must be 'uniform' or 'unigram', got '{self.sampler}'")
        if self.out_of_vocab not in ("error", "hash"):
            raise ValueError(f"loader.out_of_vocab must be 'error' or 'hash', got '{self.out_of_vocab}'")
        if not self.history_bags or min(self.history_bags) < 0 or len(set(self.history_bags)) != len(self.history_bags):
            raise ValueError(f"loader.history_bags must be distinct non-negative lengths, got {self.history_bags}")


@dataclass(frozen=True)
class Column:
    name: str
    vocab: int
    multi: bool


def query_columns(meta: schema.Metadata) -> list[Column]:
    columns = [Column(schema.USER, meta.user_vocab, False), Column(schema.HISTORY, meta.item_vocab, True)]
    columns += [Column(f.name, f.vocab_size, f.multi) for f in meta.user_features + meta.context_features]
    return columns


def query_keys(meta: schema.Metadata, cfg: LoaderConfig) -> list[str]:
    """KJT keys of the query tower, in batch order; the model builds its tables from the same list."""
    keys = [history_key(k) for k in cfg.history_bags]
    keys += ["user_id"] if cfg.use_user_id else []
    return keys + [f.name for f in meta.user_features + meta.context_features]


def candidate_keys(meta: schema.Metadata) -> list[str]:
    return [ITEM_KEY] + [candidate_key(f.name) for f in meta.item_features]


class Catalogue:
    """Item features as CSR arrays in memory (size of the catalogue, not of the data), and freq."""

    def __init__(self, directory: Path, meta: schema.Metadata):
        path = directory / schema.ITEMS_FILE
        table = RowGroupReader.open(path).read()
        self.path = path
        self.freq = np.r_[0, table.column(schema.FREQ).to_numpy()].astype(np.int64)
        self.features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for spec in meta.item_features:
            column = require_column(table, spec.name, path)
            if spec.multi:
                offsets, values = list_offsets_values(column)
            else:
                values = column.to_numpy()
                offsets = np.arange(len(values) + 1, dtype=np.int64)
            offsets = np.r_[0, offsets]  # row 0: the pad item has no features
            check_ids(values, spec.vocab_size, path, spec.name, "error")
            self.features[spec.name] = (offsets, values)

    def candidate_arrays(self, ids: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        arrays = [(np.ones(len(ids), dtype=np.int64), ids)]
        for offsets, values in self.features.values():
            arrays.append(gather_csr(offsets, values, ids))
        return arrays


def require_column(table: pa.Table, name: str, path: Path) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise DataError(path, name, "a column with this name (see metadata.json)", f"columns {table.column_names}")
    return table.column(name)


def check_ids(values: np.ndarray, vocab: int, path: Path, column: str, out_of_vocab: str) -> np.ndarray:
    """Ids must lie in [0, vocab); 'hash' folds larger ones into range instead of failing."""
    if len(values) == 0:
        return values
    low, high = values.min(), values.max()
    if low < 0:
        raise DataError(path, column, "non-negative ids", f"{int(low)}")
    if high >= vocab:
        if out_of_vocab == "hash":
            return values % vocab
        raise DataError(path, column, f"ids below the vocabulary size {vocab} (metadata.json)", f"{int(high)}")
    return values


class RowGroupReader:
    """One Parquet file: opened lazily, with every failure turned into a DataError naming the file."""

    def __init__(self, path: Path, file: pq.ParquetFile):
        self.path = path
        self.file = file

    @classmethod
    def open(cls, path: Path) -> "RowGroupReader":
        if not path.is_file():
            raise DataError(path, None, "an existing Parquet file", "no such file")
        if path.stat().st_size == 0:
            raise DataError(path, None, "a Parquet file with at least one row", "an empty file")
        try:
            return cls(path, pq.ParquetFile(path))
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(path, None, "a valid Parquet file", str(err).splitlines()[0]) from err

    def read(self, row_group: int | None = None, columns: list[str] | None = None) -> pa.Table:
        try:
            if row_group is None:
                return self.file.read(columns=columns)
            return self.file.read_row_group(row_group, columns=columns)
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(self.path, None, "a valid Parquet file", str(err).splitlines()[0]) from err


class ExampleSource:
    """The row groups of a split, validated: schema on open, nulls and id ranges on every read."""

    def __init__(self, paths: list[Path], columns: list[Column], out_of_vocab: str):
        self.columns = columns
        self.out_of_vocab = out_of_vocab
        self.readers = [RowGroupReader.open(p) for p in paths]
        self.units: list[tuple[int, int]] = []
        sizes = []
        for index, reader in enumerate(self.readers):
            self.check_schema(reader)
            meta = reader.file.metadata
            if meta.num_rows == 0:
                raise DataError(reader.path, None, "at least one row", "no rows")
            for rg in range(meta.num_row_groups):
                self.units.append((index, rg))
                sizes.append(meta.row_group(rg).num_rows)
        self.sizes = np.array(sizes, dtype=np.int64)

    def check_schema(self, reader: RowGroupReader) -> None:
        arrow_schema = reader.file.schema_arrow
        for column in self.columns:
            if column.name not in arrow_schema.names:
                raise DataError(reader.path, column.name, "a column with this name (see metadata.json)",
                                f"columns {arrow_schema.names}")
            kind = arrow_schema.field(column.name).type
            if column.multi:
                ok = (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)
                expected = "list<int64> ids"
            else:
                ok = pa.types.is_integer(kind)
                expected = "int64 ids"
            if not ok:
                raise DataError(reader.path, column.name, expected, f"type {kind}")

    def read(self, unit: int) -> pa.Table:
        file_index, rg = self.units[unit]
        reader = self.readers[file_index]
        table = reader.read(rg, [c.name for c in self.columns])
        for column in self.columns:
            array = table.column(column.name)
            if array.null_count:
                raise DataError(reader.path, column.name, "no nulls", f"{array.null_count} in row group {rg}")
            if column.multi:
                flat = pc.list_flatten(array)
                if flat.null_count:
                    raise DataError(reader.path, column.name, "no null list elements",
                                    f"{flat.null_count} in row group {rg}")
                values = flat.to_numpy()
                fixed = check_ids(values, column.vocab, reader.path, column.name, self.out_of_vocab)
                if fixed is not values:
                    offsets, _ = list_offsets_values(array)
                    table = table.set_column(table.column_names.index(column.name), column.name,
                                             pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                                      pa.array(fixed)))
            else:
                values = array.to_numpy()
                fixed = check_ids(values, column.vocab, reader.path, column.name, self.out_of_vocab)
                if fixed is not values:
                    table = table.set_column(table.column_names.index(column.name), column.name, pa.array(fixed))
        return table


def rank_slices(sizes: np.ndarray, order: np.ndarray, rank: int, world: int) -> list[tuple[int, int, int]]:
    """(unit, start, stop) row ranges of this rank: a contiguous 1/world of the ordered row stream."""
    total = int(sizes.sum())
    lo, hi = rank * total // world, (rank + 1) * total // world
    ends = np.cumsum(sizes[order])
    starts = ends - sizes[order]
    slices = []
    for unit, start, end in zip(order, starts, ends):
        a, b = max(start, lo), min(end, hi)
        if a < b:
            slices.append((int(unit), int(a - start), int(b - start)))
    return slices


def batches_per_rank(total: int, world: int, batch_size: int) -> int:
    """Batches every rank runs: enough for the largest rank's share, ceil(ceil(total / world) / batch)."""
    largest_share = (total + world - 1) // world
    return (largest_share + batch_size - 1) // batch_size


class Rows:
    """A block of examples as numpy arrays (CSR for list columns) plus one trailing pad row.

    Batches are index arrays into a block, so shuffling costs nothing until the batch's own values
    are gathered, and padding is just the index of the pad row.
    """

    def __init__(self, lists: dict[str, tuple[np.ndarray, np.ndarray]], scalars: dict[str, np.ndarray], n: int):
        self.lists, self.scalars, self.n = lists, scalars, n

    @classmethod
    def from_tables(cls, tables: list[pa.Table], columns: list[Column]) -> "Rows":
        n = sum(len(t) for t in tables)
        lists, scalars = {}, {}
        for column in columns:
            if column.multi:
                parts = [list_offsets_values(t.column(column.name)) for t in tables]
                lengths = np.concatenate([np.diff(o) for o, _ in parts] + [np.zeros(1, dtype=np.int64)])
                values = np.concatenate([v for _, v in parts]) if parts else np.zeros(0, dtype=np.int64)
                lists[column.name] = (offsets_from_lengths(lengths), values)
            else:
                scalars[column.name] = np.concatenate([t.column(column.name).to_numpy() for t in tables]
                                                      + [np.zeros(1, dtype=np.int64)])
        return cls(lists, scalars, n)

    @property
    def pad(self) -> int:
        return self.n

    def ragged(self, name: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        offsets, values = self.lists[name]
        lengths = offsets[idx + 1] - offsets[idx]
        return lengths, gather_ragged(values, offsets[idx], lengths)

    def take(self, idx: np.ndarray) -> "Rows":
        lists = {}
        for name in self.lists:
            lengths, values = self.ragged(name, np.r_[idx, self.pad])
            lists[name] = (offsets_from_lengths(lengths), values)
        return Rows(lists, {k: v[np.r_[idx, self.pad]] for k, v in self.scalars.items()}, len(idx))


class ExampleLoader:
    """Training (shuffled, with negatives) or evaluation (in order) batches of one rank."""

    def __init__(self, directory: str | Path, cfg: LoaderConfig, split: str = "train", rank: int = 0,
                 world_size: int = 1, meta: schema.Metadata | None = None):
        self.directory = Path(directory)
        self.meta = meta or schema.Metadata.load(self.directory)
        self.cfg = cfg
        self.split = split
        self.rank, self.world = rank, world_size
        self.train = split == "train"
        self.columns = query_columns(self.meta)
        if self.train:
            self.columns.append(Column(schema.TARGET, self.meta.item_vocab, False))
            paths = [self.directory / name for name in self.meta.train_files]
        else:
            self.columns += [Column(schema.TARGETS, self.meta.item_vocab, True),
                             Column(schema.SEEN, self.meta.item_vocab, True)]
            paths = [self.directory / SPLIT_FILES[split]]
        self.source = ExampleSource(paths, self.columns, cfg.out_of_vocab)
        self.catalogue = Catalogue(self.directory, self.meta)
        self.sampler = NegativeSampler(self.catalogue.freq, cfg.sampler, cfg.unigram_alpha)
        self.query_keys = query_keys(self.meta, cfg)
        self.candidate_keys = candidate_keys(self.meta)
        self.num_examples = int(self.source.sizes.sum())

    def __len__(self) -> int:
        return batches_per_rank(self.num_examples, self.world, self.cfg.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[TrainBatch | EvalBatch]:
        """The batches of one epoch from `start_batch` on, built in a background thread."""
        return Prefetcher(self._batches(epoch, start_batch), self.cfg.prefetch_batches)

    def _tables(self, order: np.ndarray) -> Iterator[pa.Table]:
        for unit, start, stop in rank_slices(self.source.sizes, order, self.rank, self.world):
            yield self.source.read(unit).slice(start, stop - start)

    def index_batches(self, epoch: int) -> Iterator[tuple[Rows, np.ndarray]]:
        """Exactly `len(self)` (block, row indices) pairs of batch_size rows; the last ones padded."""
        b = self.cfg.batch_size
        order = np.arange(len(self.source.units))
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        if self.train:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(order)
        threshold = self.cfg.shuffle_buffer if self.train else b
        carry = Rows.from_tables([], self.columns)
        pending: list[pa.Table] = []
        buffered = emitted = 0
        # Reading and decoding row groups runs one stage ahead, in its own thread.
        for table in Prefetcher(self._tables(order), 2):
            pending.append(table)
            buffered += len(table)
            if buffered < threshold:
                continue
            block = concat_rows(carry, Rows.from_tables(pending, self.columns))
            idx = rng.permutation(block.n) if self.train else np.arange(block.n)
            full = block.n // b * b
            for lo in range(0, full, b):
                yield block, idx[lo:lo + b]
            emitted += full // b
            carry, pending, buffered = block.take(idx[full:]), [], block.n - full
        block = concat_rows(carry, Rows.from_tables(pending, self.columns))
        idx = rng.permutation(block.n) if self.train else np.arange(block.n)
        for lo in range(0, b * (len(self) - emitted), b):
            rows = idx[lo:lo + b]
            yield block, np.r_[rows, np.full(b - len(rows), block.pad)]

    def _batches(self, epoch: int, start_batch: int) -> Iterator[TrainBatch | EvalBatch]:
        for index, (block, idx) in enumerate(self.index_batches(epoch)):
            if index < start_batch:
                continue
            if self.train:
                yield self.train_batch(block, idx, np.random.default_rng([self.cfg.seed, epoch, self.rank, index]))
            else:
                yield self.eval_batch(block, idx)

    def query_arrays(self, block: Rows, idx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(lengths, values) per query key, in `self.query_keys` order, gathered straight from the block."""
        offsets, values = block.lists[schema.HISTORY]
        lengths = offsets[idx + 1] - offsets[idx]
        arrays = []
        for k in self.cfg.history_bags:
            bag = lengths if k == 0 else np.minimum(lengths, k)
            arrays.append((bag, gather_ragged(values, offsets[idx + 1] - bag, bag)))
        if self.cfg.use_user_id:
            arrays.append((np.ones(len(idx), dtype=np.int64), block.scalars[schema.USER][idx]))
        for spec in self.meta.user_features + self.meta.context_features:
            if spec.multi:
                arrays.append(block.ragged(spec.name, idx))
            else:
                arrays.append((np.ones(len(idx), dtype=np.int64), block.scalars[spec.name][idx]))
        return arrays

    def train_batch(self, block: Rows, idx: np.ndarray, rng: np.random.Generator) -> TrainBatch:
        targets = block.scalars[schema.TARGET][idx]
        negatives = self.sampler.sample(self.cfg.num_negatives, rng)
        candidates = np.concatenate([targets, negatives])
        pad = np.zeros(len(negatives), dtype=np.int64)
        arrays = [(np.concatenate([lengths, pad]), values) for lengths, values in self.query_arrays(block, idx)]
        arrays += self.catalogue.candidate_arrays(candidates)
        return TrainBatch(sparse=make_kjt(self.query_keys + self.candidate_keys, arrays),
                          candidate_ids=torch.from_numpy(candidates),
                          row_mask=torch.from_numpy(targets > 0))

    def eval_batch(self, block: Rows, idx: np.ndarray) -> EvalBatch:
        t_lengths, t_values = block.ragged(schema.TARGETS, idx)
        s_lengths, s_values = block.ragged(schema.SEEN, idx)
        users = block.scalars[schema.USER][idx]
        empty = (np.zeros(len(idx), dtype=np.int64), np.zeros(0, dtype=np.int64))
        arrays = self.query_arrays(block, idx) + [empty] * len(self.candidate_keys)
        return EvalBatch(sparse=make_kjt(self.query_keys + self.candidate_keys, arrays),
                         users=torch.from_numpy(users), row_mask=torch.from_numpy(users > 0),
                         target_offsets=torch.from_numpy(offsets_from_lengths(t_lengths)),
                         target_values=torch.from_numpy(t_values),
                         seen_offsets=torch.from_numpy(offsets_from_lengths(s_lengths)),
                         seen_values=torch.from_numpy(s_values))


def concat_rows(a: Rows, b: Rows) -> Rows:
    """Concatenation without either block's pad row; the result gets a fresh one."""
    lists = {}
    for name, (a_off, a_val) in a.lists.items():
        b_off, b_val = b.lists[name]
        lengths = np.concatenate([np.diff(a_off)[:a.n], np.diff(b_off)[:b.n], [0]])
        lists[name] = (offsets_from_lengths(lengths), np.concatenate([a_val[:a_off[a.n]], b_val[:b_off[b.n]]]))
    scalars = {k: np.concatenate([v[:a.n], b.scalars[k][:b.n], [0]]) for k, v in a.scalars.items()}
    return Rows(lists, scalars, a.n + b.n)


def make_kjt(keys: list[str], arrays: list[tuple[np.ndarray, np.ndarray]]) -> KeyedJaggedTensor:
    lengths = np.concatenate([a[0] for a in arrays], dtype=np.int32)
    values = np.concatenate([a[1] for a in arrays], dtype=np.int64)
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths))


class Prefetcher:
    """Runs a batch generator in a daemon thread, `depth` batches ahead; re-raises its errors here."""

    _END = object()

    def __init__(self, source: Iterator, depth: int):
        self.done = False
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True)
        self.thread.start()

    def _run(self, source: Iterator) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, not swallowed
            self._put(err)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        item = self.queue.get()
        if item is self._END:
            self.done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.done = True
            raise item
        return item

    def close(self) -> None:
        self.stop.set()

    def __del__(self) -> None:
        self.stop.set()
