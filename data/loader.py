"""Pipelined, rank-sharded Parquet loaders: row groups -> shuffled Arrow tables -> KJT batches.

`TrainLoader` yields `TrainBatch`es (shuffled, with sampled negatives) and `EvalLoader` yields
`EvalBatch`es (in order, with targets and seen items); both share the reading, rank splitting and
batching of `SplitLoader`. Guarantees (tested in tests/test_loader.py):
- every example is yielded exactly once per epoch across ranks, and every rank yields the same
  number of batches of the same size (the last batch is padded; padding rows have row_mask False);
- Arrow list offsets/values become KJT lengths/values with numpy only, never per-row Python;
- memory is bounded by the shuffle buffer and the prefetch queue, not by the dataset size;
- ids are validated per row group as they are read (data/parquet.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch

from config import LoaderConfig
from data import schema
from data.batch import EvalBatch, TrainBatch, make_kjt
from data.catalogue import Catalogue
from data.keys import Jagged, QueryLayout, candidate_keys
from data.parquet import Column, ExampleSource
from data.prefetch import Prefetcher
from data.ragged import offsets_from_lengths
from data.ranks import batches_per_rank, rank_slices
from data.rows import Rows, concat_rows
from data.sampler import NegativeSampler

EVAL_FILES = {"valid": schema.VALID_FILE, "test": schema.TEST_FILE}


def query_columns(meta: schema.Metadata) -> list[Column]:
    columns = [Column(schema.USER, meta.user_vocab, False), Column(schema.HISTORY, meta.item_vocab, True)]
    return columns + [Column(f.name, f.vocab_size, f.multi) for f in meta.user_features + meta.context_features]


class SplitLoader(ABC):
    """One rank's batches of one split. Subclasses say which files and columns, in which order, and
    how a batch is made; reading, rank splitting, shuffling and padding are shared."""

    def __init__(self, directory: str | Path, cfg: LoaderConfig, batch_size: int, rank: int = 0,
                 world_size: int = 1, meta: schema.Metadata | None = None):
        self.directory = Path(directory)
        self.meta = meta or schema.Metadata.load(self.directory)
        self.cfg, self.batch_size = cfg, batch_size
        self.rank, self.world = rank, world_size
        self.catalogue = Catalogue(self.directory, self.meta)
        self.layout = QueryLayout.for_data(self.meta, cfg.history_bags, cfg.use_user_id)
        self.query_keys = self.layout.keys
        self.candidate_keys = candidate_keys([f.name for f in self.meta.item_features])
        self.columns = query_columns(self.meta) + self.extra_columns()
        self.source = ExampleSource(self.paths(), self.columns, cfg.out_of_vocab)
        self.num_examples = int(self.source.sizes.sum())

    @abstractmethod
    def extra_columns(self) -> list[Column]:
        """The split's own columns (the target, or targets and seen items)."""

    @abstractmethod
    def paths(self) -> list[Path]:
        """The split's Parquet files."""

    def unit_order(self, epoch: int) -> np.ndarray:
        """The order row groups are read in."""
        return np.arange(len(self.source.units))

    def row_order(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """The order of a block's rows."""
        return np.arange(n)

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
        for unit, start, stop in rank_slices(self.source.sizes, order, self.rank, self.world):
            yield self.source.read(unit).slice(start, stop - start)

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
            idx = self.row_order(block.n, rng)
            full = block.n // b * b
            for lo in range(0, full, b):
                yield block, idx[lo:lo + b]
            emitted += full // b
            carry, pending, buffered = block.take(idx[full:]), [], block.n - full
        block = concat_rows(carry, Rows.from_tables(pending, self.columns))
        idx = self.row_order(block.n, rng)
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
    """Training examples, shuffled (row groups per epoch, rows within a buffer), plus S negatives per
    batch drawn from the proposal `sampler.probs` (which the loss's logQ reads)."""

    split = "train"

    def __init__(self, directory: str | Path, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 meta: schema.Metadata | None = None):
        super().__init__(directory, cfg, cfg.batch_size, rank, world_size, meta)
        self.sampler = NegativeSampler(self.catalogue.freq, cfg.sampler, cfg.unigram_alpha)

    def extra_columns(self) -> list[Column]:
        return [Column(schema.TARGET, self.meta.item_vocab, False)]

    def paths(self) -> list[Path]:
        return [self.directory / name for name in self.meta.train_files]

    def unit_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.source.units))

    def row_order(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(n)

    def buffer_rows(self) -> int:
        return self.cfg.shuffle_buffer

    def make_batch(self, block: Rows, idx: np.ndarray, epoch: int, index: int) -> TrainBatch:
        rng = np.random.default_rng([self.cfg.seed, epoch, self.rank, index])
        targets = block.scalars[schema.TARGET][idx]
        negatives = self.sampler.sample(self.cfg.num_negatives, rng)
        candidates = np.concatenate([targets, negatives])
        pad = np.zeros(len(negatives), dtype=np.int64)
        arrays = [(np.concatenate([lengths, pad]), values) for lengths, values in self.query_arrays(block, idx)]
        arrays += self.catalogue.candidate_arrays(candidates)
        return TrainBatch(sparse=make_kjt(self.query_keys + self.candidate_keys, arrays),
                          candidate_ids=torch.from_numpy(candidates), row_mask=torch.from_numpy(targets > 0))


class EvalLoader(SplitLoader):
    """Validation or test queries in file order, with their targets and seen items; candidate keys are
    present but empty, so the same EBC call applies."""

    def __init__(self, directory: str | Path, cfg: LoaderConfig, split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1, meta: schema.Metadata | None = None):
        if split not in EVAL_FILES:
            raise ValueError(f"an evaluation split is one of {list(EVAL_FILES)}, got '{split}'")
        self.split = split
        super().__init__(directory, cfg, batch_size, rank, world_size, meta)

    def extra_columns(self) -> list[Column]:
        return [Column(schema.TARGETS, self.meta.item_vocab, True), Column(schema.SEEN, self.meta.item_vocab, True)]

    def paths(self) -> list[Path]:
        return [self.directory / EVAL_FILES[self.split]]

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


def open_loader(directory: str | Path, cfg: LoaderConfig, split: str = "train", rank: int = 0, world_size: int = 1,
                meta: schema.Metadata | None = None, batch_size: int | None = None) -> SplitLoader:
    """The loader of a split: training batches of `cfg.batch_size`, or evaluation batches of `batch_size`."""
    if split == "train":
        return TrainLoader(directory, cfg, rank, world_size, meta)
    return EvalLoader(directory, cfg, split, batch_size or cfg.batch_size, rank, world_size, meta)
