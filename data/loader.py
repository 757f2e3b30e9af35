"""Pipelined, rank-sharded Parquet loaders: row groups -> shuffled Arrow tables -> KJT batches.

`TrainLoader` yields `TrainBatch`es (shuffled, with sampled negatives) and `EvalLoader` yields
`EvalBatch`es (in order, with targets and seen items); both share the reading, rank splitting and
batching of `SplitLoader`. Guarantees (tested in tests/data/test_loader.py):
- every example is yielded exactly once per epoch across ranks, and every rank yields the same
  number of batches of the same size (the last batch is padded; padding rows have row_mask False);
- Arrow list offsets/values become KJT lengths/values with numpy only, never per-row Python;
- memory is bounded by the shuffle buffer and the prefetch queue, not by the dataset size;
- ids are validated per row group as they are read (data/parquet.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from config import LoaderConfig, NegativesConfig
from data import schema
from data.batch import EvalBatch, SequenceBatch, SequenceEvalBatch, TrainBatch, make_kjt, no_lanes
from data.catalogue import Catalogue
from data.errors import DataError
from data.keys import ITEM_KEY, SEQUENCE_KEY, Jagged, QueryLayout, candidate_keys, last_items
from data.negatives import Negatives
from data.parquet import Column, ExampleSource
from data.prefetch import Prefetcher
from data.ragged import gather_csr, list_offsets_values, offsets_from_lengths, pack_lanes, padded_rows
from data.ranks import batches_per_rank, rank_slices
from data.rows import Rows, concat_rows
from data.sequences import chunk_counts, chunk_table
from storage import Location, location

EVAL_SPLITS = ("valid", "test")


def query_columns(meta: schema.Metadata) -> list[Column]:
    columns = [Column(schema.USER, meta.user_vocab, False), Column(schema.HISTORY, meta.item_vocab, True)]
    return columns + [Column(f.name, f.vocab_size, f.multi) for f in meta.user_features + meta.context_features]


class SplitLoader(ABC):
    """One rank's batches of one split. Subclasses say which files and columns, in which order, and
    how a batch is made; reading, rank splitting, shuffling and padding are shared."""

    sequence = False  # sequence batches (SEQUENCE below): the history unpooled, a query at every position

    split = "train"  # the metadata's name of the split's files (schema.SPLIT_DIRS)

    def __init__(self, directory: "str | Location", cfg: LoaderConfig, batch_size: int, rank: int = 0,
                 world_size: int = 1, meta: schema.Metadata | None = None):
        self.directory = location(directory)
        self.meta = meta or schema.Metadata.load(self.directory)
        self.cfg, self.batch_size = cfg, batch_size
        self.rank, self.world = rank, world_size
        self.catalogue = Catalogue(self.directory, self.meta)
        # The transformer tower reads the history unpooled (SEQUENCE_KEY) and the item id through its
        # EmbeddingCollection, so its EBC keys have no history bags and no item id.
        self.layout = QueryLayout.for_data(self.meta, () if self.sequence else cfg.history_bags, cfg.use_user_id)
        self.query_keys = self.layout.keys
        self.candidate_keys = candidate_keys([f.name for f in self.meta.item_features])[int(self.sequence):]
        self.columns = self.split_columns()
        self.source = ExampleSource(self.paths(), self.columns, cfg.out_of_vocab)
        self.sizes = self.unit_sizes()
        self.num_examples = int(self.sizes.sum())

    def split_columns(self) -> list[Column]:
        return query_columns(self.meta) + self.extra_columns()

    def unit_sizes(self) -> np.ndarray:
        """Examples per row group (rows, unless a subclass expands rows into several examples)."""
        return self.source.sizes

    def read_unit(self, unit: int) -> pa.Table:
        """One row group's examples."""
        return self.source.read(unit)

    @abstractmethod
    def extra_columns(self) -> list[Column]:
        """The split's own columns (the target, or targets and seen items)."""

    def paths(self) -> list[Location]:
        """The split's Parquet files, in order."""
        return [self.directory / name for name in self.meta.files.get(self.split, [])]

    def unit_order(self, epoch: int) -> np.ndarray:
        """The order row groups are read in."""
        return np.arange(len(self.source.units))

    def row_order(self, block: Rows, rng: np.random.Generator) -> np.ndarray:
        """The order of a block's rows: its first `block.n // batch_size` batches are cut from it in this order,
        the rest is carried into the next block."""
        return np.arange(block.n)

    def buffer_rows(self) -> int:
        """How many rows are gathered before a block is ordered and cut into batches."""
        return self.batch_size

    @abstractmethod
    def make_batch(self, block: Rows, idx: np.ndarray, epoch: int, index: int):
        """The batch of rows `idx` of `block`, the `index`-th of the epoch."""

    def __len__(self) -> int:
        return batches_per_rank(self.num_examples, self.world, self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator:
        """The batches of one epoch from `start_batch` on, built in a background thread."""
        return Prefetcher(self._batches(epoch, start_batch), self.cfg.prefetch_batches)

    def _tables(self, order: np.ndarray) -> Iterator[pa.Table]:
        for unit, start, stop in rank_slices(self.sizes, order, self.rank, self.world):
            yield self.read_unit(unit).slice(start, stop - start)

    def index_batches(self, epoch: int) -> Iterator[tuple[Rows, np.ndarray]]:
        """Exactly `len(self)` (block, row indices) pairs of batch_size rows; the last ones padded."""
        b = self.batch_size
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank])
        carry = Rows.from_tables([], self.columns)
        pending: list[pa.Table] = []
        buffered = emitted = 0
        # Reading and decoding row groups runs one stage ahead, in its own thread.
        for table in Prefetcher(self._tables(self.unit_order(epoch)), 2):
            pending.append(table)
            buffered += len(table)
            if buffered < self.buffer_rows():
                continue
            block = concat_rows(carry, Rows.from_tables(pending, self.columns))
            idx = self.row_order(block, rng)
            full = block.n // b * b
            for lo in range(0, full, b):
                yield block, idx[lo:lo + b]
            emitted += full // b
            carry, pending, buffered = block.take(idx[full:]), [], block.n - full
        block = concat_rows(carry, Rows.from_tables(pending, self.columns))
        idx = self.row_order(block, rng)
        for lo in range(0, b * (len(self) - emitted), b):
            rows = idx[lo:lo + b]
            yield block, np.r_[rows, np.full(b - len(rows), block.pad)]

    def _batches(self, epoch: int, start_batch: int) -> Iterator:
        for index, (block, idx) in enumerate(self.index_batches(epoch)):
            if index >= start_batch:
                yield self.make_batch(block, idx, epoch, index)

    def query_arrays(self, block: Rows, idx: np.ndarray) -> list[Jagged]:
        """(lengths, values) per query key, in `self.query_keys` order, gathered straight from the block."""
        return self.layout.arrays(block.lists[schema.HISTORY], block.scalars[schema.USER], block.columns(), idx)


class TrainLoader(SplitLoader):
    """Training examples, shuffled (row groups per epoch, rows within a buffer), plus the negatives drawn per
    batch by `negatives` (data/negatives.py; the loss's logQ reads the same object)."""

    def __init__(self, directory: "str | Location", cfg: LoaderConfig, negatives: NegativesConfig, rank: int = 0,
                 world_size: int = 1, meta: schema.Metadata | None = None):
        super().__init__(directory, cfg, cfg.batch_size, rank, world_size, meta)
        self.negatives = Negatives.of(negatives, self.catalogue.freq)

    def extra_columns(self) -> list[Column]:
        return [Column(schema.TARGET, self.meta.item_vocab, False)]

    def unit_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.source.units))

    def row_order(self, block: Rows, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(block.n)

    def buffer_rows(self) -> int:
        return self.cfg.shuffle_buffer

    def make_batch(self, block: Rows, idx: np.ndarray, epoch: int, index: int) -> TrainBatch:
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, index])
        targets = block.scalars[schema.TARGET][idx]
        negatives = self.negatives.sample(rng)
        candidates = np.concatenate([targets, negatives])
        pad = np.zeros(len(negatives), dtype=np.int64)
        query = self.query_arrays(block, idx)
        bags = len(self.layout.history_bags)
        query = query[:bags] + drop_features(query[bags:], self.layout.multi, self.cfg.feature_dropout, rng)
        arrays = [(np.concatenate([lengths, pad]), values) for lengths, values in query]
        arrays += self.catalogue.candidate_arrays(candidates)
        return TrainBatch(sparse=make_kjt(self.query_keys + self.candidate_keys, arrays),
                          candidate_ids=torch.from_numpy(candidates), row_mask=torch.from_numpy(targets > 0))


class SequenceLoader(TrainLoader):
    """Training rows of the transformer tower: each user's sequence (the prepared sequences file, built from
    the training split) cut into chunks of at most `loader.max_sequence_length` inputs (data/sequences.py),
    shuffled like TrainLoader's examples; `loader.batch_size` counts chunks. Every position whose next event
    is a training target is trained, so each training target is predicted exactly once per epoch."""

    sequence = True
    split = "train_sequences"

    def split_columns(self) -> list[Column]:
        vocab = self.meta.item_vocab
        columns = [Column(schema.USER, self.meta.user_vocab, False), Column(schema.SEQUENCE_ITEMS, vocab, True),
                   Column(schema.SEQUENCE_TARGETS, vocab, True)]
        columns += [Column(f.name, f.vocab_size, f.multi) for f in self.meta.user_features]
        columns += [Column(schema.SEQUENCE_TIMES, None, True)] if self.meta.event_times else []
        return columns + [Column(f.name, f.vocab_size, True) for f in self.meta.context_features]

    def unit_sizes(self) -> np.ndarray:
        sizes = []
        for file_index, rg in self.source.units:
            items = self.source.readers[file_index].read(rg, [schema.SEQUENCE_ITEMS]).column(schema.SEQUENCE_ITEMS)
            offsets, _ = list_offsets_values(items)
            sizes.append(int(chunk_counts(np.diff(offsets), self.cfg.max_sequence_length).sum()))
        return np.array(sizes, dtype=np.int64)

    def row_order(self, block: Rows, rng: np.random.Generator) -> np.ndarray:
        """Shuffled; with `loader.bucket_by_length`, the block's full batches are then cut from its rows sorted by
        length and sent in random order, so a batch's rows have about one length and its padded stack computes
        little padding. Still a permutation: every row once per epoch, the remainder carried at random."""
        order = rng.permutation(block.n)
        if not self.cfg.bucket_by_length:
            return order
        return bucketed(order, np.diff(block.lists[schema.SEQUENCE_ITEMS][0])[:block.n], self.batch_size, rng)

    def read_unit(self, unit: int) -> pa.Table:
        aligned = [schema.SEQUENCE_TARGETS] + [f.name for f in self.meta.context_features]
        spans = (schema.SEQUENCE_TIMES,) if self.meta.event_times else ()
        table = self.source.read(unit)
        try:
            return chunk_table(table, schema.SEQUENCE_ITEMS, aligned, self.cfg.max_sequence_length, spans)
        except ValueError as err:
            expected = f"list columns aligned with {schema.SEQUENCE_ITEMS} (one value per event)"
            raise DataError(self.source.readers[self.source.units[unit][0]].path, None, expected, str(err)) from err

    def make_batch(self, block: Rows, idx: np.ndarray, epoch: int, index: int) -> SequenceBatch:
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, index])
        lengths, inputs = block.ragged(schema.SEQUENCE_ITEMS, idx)
        _, labels = block.ragged(schema.SEQUENCE_TARGETS, idx)
        width = max(int(lengths.max(initial=0)), 1)
        row = np.repeat(np.arange(len(idx)), lengths)
        step = np.arange(len(inputs)) - np.repeat(offsets_from_lengths(lengths)[:-1], lengths)
        real = labels > 0
        positions, targets = (row * width + step)[real], labels[real]
        distinct, own = np.unique(targets, return_inverse=True)
        candidates = np.concatenate([distinct, self.negatives.sample(rng)])
        n, p, c = len(idx), len(targets), len(candidates)
        sequence = make_kjt([SEQUENCE_KEY, ITEM_KEY], [(np.r_[lengths, np.zeros(c, np.int64)], inputs),
                                                       (np.r_[np.zeros(n, np.int64), np.ones(c, np.int64)],
                                                        candidates)])
        query = drop_features(self.position_features(block, idx[row[real]], idx, real), self.layout.multi,
                              self.cfg.feature_dropout, rng)
        arrays = [(np.r_[lengths_, np.zeros(c, np.int64)], values) for lengths_, values in query]
        arrays += [(np.r_[np.zeros(p, np.int64), lengths_], values)
                   for lengths_, values in self.catalogue.candidate_arrays(candidates)[1:]]
        times = padded_rows(*block.ragged(schema.SEQUENCE_TIMES, idx), width + 1) if self.meta.event_times else None
        lanes = torch.from_numpy(pack_lanes(lengths, width)) if self.cfg.pack_rows else no_lanes()
        return SequenceBatch(sparse=make_kjt(self.query_keys + self.candidate_keys, arrays), sequence=sequence,
                             positions=torch.from_numpy(positions), own_column=torch.from_numpy(own.reshape(-1)),
                             candidate_ids=torch.from_numpy(candidates),
                             num_positives=torch.tensor([len(distinct)]), row_mask=torch.from_numpy(lengths > 0),
                             lanes=lanes, **({} if times is None else {"times": torch.from_numpy(times)}))

    def position_features(self, block: Rows, rows: np.ndarray, idx: np.ndarray, real: np.ndarray) -> list[Jagged]:
        """Query features of each real position: its row's user features, and the context of its target event."""
        columns: dict[str, np.ndarray | Jagged] = {}
        for spec in self.meta.user_features:
            if spec.multi:
                lengths, values = gather_csr(*block.lists[spec.name], rows)
                columns[spec.name] = (offsets_from_lengths(lengths), values)
            else:
                columns[spec.name] = block.scalars[spec.name][rows]
        for spec in self.meta.context_features:
            columns[spec.name] = block.ragged(spec.name, idx)[1][real]
        empty = (np.zeros(len(rows) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
        return self.layout.arrays(empty, block.scalars[schema.USER][rows], columns, np.arange(len(rows)))


def bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """`order` with its first len(order) // batch_size full batches regrouped by row length (a stable sort of
    those rows, cut into batches, the batches shuffled); the remainder keeps its place and order."""
    full = len(order) // batch_size * batch_size
    head = order[:full]
    head = head[np.argsort(lengths[head], kind="stable")].reshape(-1, batch_size)
    return np.concatenate([head[rng.permutation(len(head))].reshape(-1), order[full:]])


def drop_features(arrays: list[Jagged], multi: list[bool], rate: float, rng: np.random.Generator) -> list[Jagged]:
    """Feature dropout for cold start: each row of each feature is dropped with probability `rate`, a scalar to
    the padding id and a list to an empty list, which is what serving sends for a feature it does not have."""
    if rate <= 0:
        return arrays
    out = []
    for (lengths, values), is_list in zip(arrays, multi):
        drop = rng.random(len(lengths)) < rate
        if is_list:
            out.append((np.where(drop, 0, lengths), values[~np.repeat(drop, lengths)]))
        else:
            out.append((lengths, np.where(drop, schema.PAD_ID, values)))
    return out


class EvalLoader(SplitLoader):
    """Validation or test queries in file order, with their targets and seen items; candidate keys are
    present but empty, so the same EBC call applies."""

    def __init__(self, directory: "str | Location", cfg: LoaderConfig, split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1, meta: schema.Metadata | None = None):
        if split not in EVAL_SPLITS:
            raise ValueError(f"an evaluation split is one of {list(EVAL_SPLITS)}, got '{split}'")
        self.split = split
        super().__init__(directory, cfg, batch_size, rank, world_size, meta)

    def extra_columns(self) -> list[Column]:
        return [Column(schema.TARGETS, self.meta.item_vocab, True), Column(schema.SEEN, self.meta.item_vocab, True)]

    def make_batch(self, block: Rows, idx: np.ndarray, epoch: int, index: int) -> EvalBatch:
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


# Evaluation rows of a sequence tower are ordered by length within buffers of this many batches.
EVAL_SORT_BATCHES = 16


class SequenceEvalLoader(EvalLoader):
    """EvalLoader for the transformer tower: each query's last `loader.max_sequence_length` history items go to
    the EmbeddingCollection, its features to the EBC; the query is the encoding at the last position. Rows come
    ordered by history length within buffers of EVAL_SORT_BATCHES batches, so a batch's rows have about one length
    and the stack computes little padding (46% of ML-1M's positions in file order, 85% of the short-history
    set's; ML-1M's validation runs 1.7x faster). Every metric is a sum over queries, so the order changes none,
    beyond float rounding where batch shapes change a query's last bits (an untrained model's ML-1M MRR by 8e-10)."""

    sequence = True

    def buffer_rows(self) -> int:
        return EVAL_SORT_BATCHES * self.batch_size

    def read_unit(self, unit: int) -> pa.Table:
        table = super().read_unit(unit)
        if self.meta.event_times:
            offsets, times = (list_offsets_values(table.column(c))[0] for c in (schema.HISTORY, schema.HISTORY_TIMES))
            if not np.array_equal(offsets, times):
                row = int(np.flatnonzero(np.diff(offsets) != np.diff(times))[0])
                raise DataError(self.source.readers[self.source.units[unit][0]].path, schema.HISTORY_TIMES,
                                f"one time per item of {schema.HISTORY}",
                                f"{int(np.diff(times)[row])} times for {int(np.diff(offsets)[row])} items in row "
                                f"{row} of row group {self.source.units[unit][1]}")
        return table

    def row_order(self, block: Rows, rng: np.random.Generator) -> np.ndarray:
        lengths = np.diff(block.lists[schema.HISTORY][0])[:block.n]
        return np.argsort(np.minimum(lengths, self.cfg.max_sequence_length), kind="stable")

    def extra_columns(self) -> list[Column]:
        times = [Column(schema.HISTORY_TIMES, None, True), Column(schema.TIMESTAMP, None, False)]
        return super().extra_columns() + (times if self.meta.event_times else [])

    def make_batch(self, block: Rows, idx: np.ndarray, epoch: int, index: int) -> SequenceEvalBatch:
        base = super().make_batch(block, idx, epoch, index)
        lengths, values = last_items(block.lists[schema.HISTORY], idx, self.cfg.max_sequence_length)
        width = max(int(lengths.max(initial=0)), 1)
        sequence = make_kjt([SEQUENCE_KEY, ITEM_KEY], [(lengths, values), (np.zeros(len(idx), np.int64),
                                                                         np.zeros(0, np.int64))])
        positions = np.arange(len(idx)) * width + np.maximum(lengths - 1, 0)
        extra = {}
        if self.meta.event_times:
            times = padded_rows(*last_items(block.lists[schema.HISTORY_TIMES], idx, self.cfg.max_sequence_length),
                                width + 1)
            times[np.arange(len(idx)), lengths] = block.scalars[schema.TIMESTAMP][idx]
            extra["times"] = torch.from_numpy(times)
        return SequenceEvalBatch(**{f: getattr(base, f) for f in base.__dataclass_fields__}, sequence=sequence,
                                 positions=torch.from_numpy(positions), **extra)


@dataclass(frozen=True)
class BatchLayout:
    """The batches a query tower trains and evaluates on (its module in towers/ names one)."""

    train: type[TrainLoader]
    eval: type[EvalLoader]

    @property
    def sequence(self) -> bool:
        """Sequence batches: every position of a row is a query (the loss reads `batch.sequence`)."""
        return self.train.sequence


POOLED = BatchLayout(TrainLoader, EvalLoader)  # one query per row, its history as pooled bags
SEQUENCE = BatchLayout(SequenceLoader, SequenceEvalLoader)  # the history unpooled, a query at every position


def open_loader(directory: "str | Location", cfg: LoaderConfig, split: str = "train", rank: int = 0,
                world_size: int = 1, meta: schema.Metadata | None = None, batch_size: int | None = None,
                layout: BatchLayout = POOLED, negatives: NegativesConfig | None = None) -> SplitLoader:
    """The loader of a split in a tower's batch layout: training batches of `cfg.batch_size` with `negatives`
    (default: the config's defaults), or evaluation batches of `batch_size`."""
    if split == "train":
        return layout.train(directory, cfg, negatives or NegativesConfig(), rank, world_size, meta)
    return layout.eval(directory, cfg, split, batch_size or cfg.batch_size, rank, world_size, meta)
