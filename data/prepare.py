"""Raw source -> prepared Parquet layout (see data/schema.py and README "Prepared layout").

    python -m data.prepare movielens ../shared/datasets/ml-1m --out prepared/ml-1m
    python -m data.prepare interactions events.parquet --user-col u --item-col i --time-col t --out ...
    python -m data.prepare sequences seq.txt.gz [--item-attributes attrs.json] --out ...
    python -m data.prepare synthetic --out prepared/synthetic [--users 20000 --items 5000]

Everything is written to a temporary directory next to `--out` and renamed into place at the end,
so a failure never leaves a partial dataset behind.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data import schema
from data.atomic import atomic_directory
from data.errors import DataError
from data.ragged import gather_ragged, list_array, offsets_from_lengths
from data.sources import RawData, read_interactions, read_movielens, read_sequences
from data.sources.movielens import with_side_tables
from data.splits import (
    LEAVE_ONE_OUT,
    TIME,
    EvalQueries,
    Split,
    SplitConfig,
    core_filter,
    leave_one_out,
    repeat_targets,
    time_split,
    user_bounds,
)

ROWS_PER_FILE = 262_144
ROW_GROUP_ROWS = 16_384
MIN_EVENTS_LEAVE_ONE_OUT = 3  # one history event, one validation target, one test target


def file_checksum(paths: list[Path]) -> tuple[str, list[dict]]:
    combined, per_file = hashlib.sha256(), []
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        per_file.append({"path": str(path), "sha256": digest.hexdigest()})
        combined.update(digest.digest())
    return combined.hexdigest(), per_file


def dense_ids(raw: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids -> dense ids 1..n (0 is reserved); returns (codes, vocabulary in id order from 1)."""
    codes, uniques = pd.factorize(pd.Series(raw), sort=True)
    return codes.astype(np.int64) + 1, np.asarray(uniques, dtype=object)


def encode_features(long: pd.DataFrame, key: str, vocab: np.ndarray, multi: set[str]) -> dict[str, dict]:
    """Long-form (key, feature, value) rows -> per feature: vocabulary and CSR rows over dense keys."""
    index = pd.Index(vocab)
    encoded = {}
    for name, rows in long.groupby("feature", sort=True):
        dense_key = index.get_indexer(rows[key].to_numpy()) + 1
        known = dense_key > 0
        value_ids, values = dense_ids(rows["value"].to_numpy()[known])
        pairs = np.unique(np.stack([dense_key[known], value_ids]), axis=1)
        if name not in multi:
            first = np.r_[True, pairs[0, 1:] != pairs[0, :-1]]
            pairs = pairs[:, first]
        lengths = np.bincount(pairs[0], minlength=len(vocab) + 1)
        encoded[name] = {"offsets": offsets_from_lengths(lengths), "values": pairs[1], "vocab": values,
                         "multi": name in multi}
    return encoded


def feature_column(feature: dict, rows: np.ndarray) -> pa.Array:
    """The feature of entities `rows` as a list column, or a scalar column (0 where missing)."""
    starts = feature["offsets"][rows]
    lengths = feature["offsets"][rows + 1] - starts
    if feature["multi"]:
        return list_array(lengths, gather_ragged(feature["values"], starts, lengths))
    scalar = np.zeros(len(rows), dtype=np.int64)
    scalar[lengths > 0] = feature["values"][starts[lengths > 0]]
    return pa.array(scalar, type=pa.int64())


def feature_specs(encoded: dict[str, dict]) -> list[schema.FeatureSpec]:
    return [schema.FeatureSpec(name, len(f["vocab"]) + 1, f["multi"],
                               float(np.diff(f["offsets"])[1:].mean()) if len(f["offsets"]) > 2 else 0.0)
            for name, f in encoded.items()]


def context_columns(timestamps: np.ndarray) -> dict[str, pa.Array]:
    """Hour of day and day of week of the request (1-based; 0 is the pad id)."""
    seconds = np.asarray(timestamps, dtype=np.int64)
    return {"c_hour": pa.array((seconds // 3600) % 24 + 1), "c_dow": pa.array((seconds // 86400 + 3) % 7 + 1)}


CONTEXT_SPECS = [schema.FeatureSpec("c_hour", 25, False), schema.FeatureSpec("c_dow", 8, False)]
# What serving is sent for them (`recommend --user-features c_hour=14,c_dow=Sat`): raw value i has id i + 1.
CONTEXT_VOCABS = {"c_hour": np.array([str(h) for h in range(24)]),
                  "c_dow": np.array(["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"])}


def history_column(items: np.ndarray, user_start: np.ndarray, cutoffs: np.ndarray, max_len: int) -> pa.ListArray:
    lengths = np.minimum(cutoffs - user_start[cutoffs] if len(cutoffs) else cutoffs, max_len)
    return list_array(lengths, gather_ragged(items, cutoffs - lengths, lengths))


def user_columns(user_features: dict[str, dict], users: np.ndarray) -> dict[str, pa.Array]:
    return {name: feature_column(feature, users) for name, feature in user_features.items()}


def write_table(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, compression="zstd")


def check_splits(split: Split, counts: np.ndarray, cfg: SplitConfig, origin: str) -> None:
    """Every split must hold something; otherwise name the split and the filters that emptied it."""
    hints = {
        "training": (f"leave-one-out trains on each user's events after the first and before the last two, so "
                     f"users need at least 4 events (the most active has {int(counts.max())})"
                     if cfg.protocol == LEAVE_ONE_OUT else
                     "the time split trains on events before the validation cutoff that follow the user's first"),
        "validation": ("no user's second-last event passed --min-relevant-rating" if cfg.protocol == LEAVE_ONE_OUT
                       else "no user with history had a relevant event in the validation window"),
        "test": ("no user's last event passed --min-relevant-rating" if cfg.protocol == LEAVE_ONE_OUT
                 else "no user with history had a relevant event in the test window"),
    }
    sizes = {"training": len(split.train_targets), "validation": len(split.valid.users), "test": len(split.test.users)}
    for name, size in sizes.items():
        if size == 0:
            raise DataError(origin, None, f"a non-empty {name} split",
                            f"none: {hints[name]}; filters in force: {filters_in_force(cfg)}")


def repeat_summary(repeat: np.ndarray, queries: EvalQueries) -> dict:
    """How many targets the user had already consumed, and how many queries have nothing else."""
    per_query = np.add.reduceat(repeat.astype(np.int64), np.cumsum(queries.target_lengths) - queries.target_lengths) \
        if len(repeat) else np.zeros(0, dtype=np.int64)
    return {"queries": len(queries.users), "targets": len(repeat), "repeat_targets": int(repeat.sum()),
            "repeat_share": float(repeat.mean()) if len(repeat) else 0.0,
            "queries_all_repeat": int((per_query == queries.target_lengths).sum())}


def filters_in_force(cfg: SplitConfig) -> str:
    """The prepare options that decide which events survive, as the user would type them."""
    parts = [f"--protocol {cfg.protocol}", f"--min-user-events {cfg.min_user_events}",
             f"--min-item-events {cfg.min_item_events}"]
    parts += [f"--min-positive-rating {cfg.min_positive_rating}"] if cfg.min_positive_rating is not None else []
    parts += [f"--min-relevant-rating {cfg.min_relevant_rating}"] if cfg.min_relevant_rating is not None else []
    if cfg.protocol == TIME:
        parts += [f"--valid-fraction {cfg.valid_fraction}", f"--test-fraction {cfg.test_fraction}"]
        parts += ["--keep-cold-users"] * cfg.keep_cold_users + ["--keep-cold-items"] * cfg.keep_cold_items
    return ", ".join(parts)


@dataclass
class FilterReport:
    """What deduplication and the k-core filter removed, for the log and metadata.json."""

    duplicate_rows: int
    events: int
    users: int
    items: int


def drop_duplicates(events: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Exact duplicates (same user, item and time) are one event written twice: keep the first."""
    duplicated = events.duplicated(["user", "item", "ts"]).to_numpy()
    return events[~duplicated], int(duplicated.sum())


def apply_filters(events: pd.DataFrame, cfg: SplitConfig, origin: str) -> tuple[pd.DataFrame, FilterReport]:
    events, duplicates = drop_duplicates(events)
    user_codes, user_vocab = dense_ids(events["user"].to_numpy())
    item_codes, item_vocab = dense_ids(events["item"].to_numpy())
    keep = core_filter(user_codes, item_codes, cfg.min_user_events, cfg.min_item_events)
    if not keep.any():
        most_user = int(np.bincount(user_codes).max())
        most_item = int(np.bincount(item_codes).max())
        raise DataError(origin, None, f"events left after the filters ({filters_in_force(cfg)}; user and item "
                                      f"minimums are applied together until both hold)",
                        f"none: the most active user has {most_user} events and the most consumed item "
                        f"{most_item}")
    kept = events[keep]
    report = FilterReport(duplicates, int((~keep).sum()), len(user_vocab) - kept["user"].nunique(),
                          len(item_vocab) - kept["item"].nunique())
    return kept, report


class Prepared:
    """Dense, user-sorted events plus encoded features: what the writers need."""

    def __init__(self, raw: RawData, cfg: SplitConfig):
        origin = raw.origin.get("user", str(raw.files[0]) if raw.files else "input").rsplit(":", 1)[0]
        if cfg.protocol == TIME and not raw.has_time:
            raise DataError(origin, None, "event times for --protocol time",
                            "positions only (a sequence file has no clock): use --protocol leave_one_out")
        events, self.filtered = apply_filters(raw.events, cfg, origin)
        self.user_ids, self.user_vocab = dense_ids(events["user"].to_numpy())
        self.item_ids, self.item_vocab = dense_ids(events["item"].to_numpy())
        order = np.lexsort((np.arange(len(events)), events["ts"].to_numpy(), self.user_ids))
        self.users = self.user_ids[order]
        self.items = self.item_ids[order]
        self.ts = events["ts"].to_numpy()[order]
        self.ratings = events["rating"].to_numpy()[order]
        self.user_start, counts = user_bounds(self.users)
        if cfg.protocol == LEAVE_ONE_OUT and counts.min() < MIN_EVENTS_LEAVE_ONE_OUT:
            short = np.flatnonzero(counts < MIN_EVENTS_LEAVE_ONE_OUT)
            example = self.user_vocab[self.users[short[0]] - 1]
            raise DataError(*raw.origin["user"].rsplit(":", 1),
                            f"at least {MIN_EVENTS_LEAVE_ONE_OUT} events per user for leave-one-out "
                            f"(history, validation, test); raise --min-user-events to drop such users",
                            f"{len(np.unique(self.users[short]))} users with fewer, e.g. user '{example}' "
                            f"with {counts[short[0]]}")
        self.item_features = encode_features(raw.item_features, "item", self.item_vocab, raw.multi_valued)
        self.user_features = encode_features(raw.user_features, "user", self.user_vocab, raw.multi_valued)
        self.titles = pd.Series(raw.titles["title"].to_numpy(), index=raw.titles["item"].to_numpy()) \
            if len(raw.titles) else pd.Series(dtype=str)
        self.has_time = raw.has_time
        if cfg.protocol == LEAVE_ONE_OUT:
            self.split = leave_one_out(self.users, self.items, self.ratings, cfg)
        else:
            self.split = time_split(self.users, self.items, self.ts, self.ratings, cfg)
        check_splits(self.split, counts, cfg, origin)
        self.repeats = {name: repeat_summary(repeat_targets(self.users, self.items, queries), queries)
                        for name, queries in (("valid", self.split.valid), ("test", self.split.test))}

    def query_columns(self, cutoffs: np.ndarray, context_events: np.ndarray, max_len: int) -> dict[str, pa.Array]:
        users = self.users[cutoffs] if len(cutoffs) else np.zeros(0, dtype=np.int64)
        columns = {schema.USER: pa.array(users, type=pa.int64()),
                   schema.HISTORY: history_column(self.items, self.user_start, cutoffs, max_len)}
        columns.update(user_columns(self.user_features, users))
        if self.has_time:
            columns.update(context_columns(self.ts[context_events]))
        return columns


def write_train(prep: Prepared, out: Path, cfg: SplitConfig, seed: int) -> list[str]:
    """Training examples, shuffled once globally (seeded) so every file and row group is a fair sample."""
    targets = np.random.default_rng(seed).permutation(prep.split.train_targets)
    (out / schema.TRAIN_DIR).mkdir()
    names = []
    chunks = range(0, max(len(targets), 1), ROWS_PER_FILE)
    for part, lo in enumerate(tqdm(chunks, desc="write train", unit="file", disable=len(chunks) < 2)):
        idx = targets[lo:lo + ROWS_PER_FILE]
        columns = prep.query_columns(idx, idx, cfg.max_history)
        columns[schema.TARGET] = pa.array(prep.items[idx], type=pa.int64())
        columns[schema.TIMESTAMP] = pa.array(prep.ts[idx], type=pa.int64())
        name = f"{schema.TRAIN_DIR}/part-{part:05d}.parquet"
        write_table(pa.table(columns), out / name)
        names.append(name)
    return names


def write_sequences(prep: Prepared, out: Path) -> np.ndarray:
    """One row per user with a training target: their events up to the last one, and which are targets.
    Built from the training split only, so validation and test targets never enter it. Returns the lengths."""
    targets = np.sort(prep.split.train_targets)
    users = prep.users[targets]
    ends = targets[np.r_[users[1:] != users[:-1], True]] + 1 if len(targets) else targets
    starts = prep.user_start[ends - 1] if len(ends) else ends
    lengths = ends - starts
    labels = np.zeros(len(prep.items), dtype=np.int64)
    labels[targets] = prep.items[targets]
    row_users = prep.users[starts] if len(starts) else np.zeros(0, dtype=np.int64)
    columns = {schema.USER: pa.array(row_users, type=pa.int64()),
               schema.SEQUENCE_ITEMS: list_array(lengths, gather_ragged(prep.items, starts, lengths)),
               schema.SEQUENCE_TARGETS: list_array(lengths, gather_ragged(labels, starts, lengths))}
    columns.update(user_columns(prep.user_features, row_users))
    if prep.has_time:
        for name, values in context_columns(gather_ragged(prep.ts, starts, lengths)).items():
            columns[name] = list_array(lengths, values.to_numpy())
    write_table(pa.table(columns), out / schema.SEQUENCES_FILE)
    return lengths


def write_eval(prep: Prepared, queries: EvalQueries, path: Path, cfg: SplitConfig) -> None:
    columns = prep.query_columns(queries.cutoffs, queries.context_event, cfg.max_history)
    columns[schema.USER] = pa.array(queries.users, type=pa.int64())
    seen_lengths = queries.cutoffs - prep.user_start[queries.cutoffs] if len(queries.cutoffs) else queries.cutoffs
    columns[schema.SEEN] = list_array(seen_lengths, gather_ragged(prep.items, queries.cutoffs - seen_lengths,
                                                                  seen_lengths))
    columns[schema.TARGETS] = list_array(queries.target_lengths, queries.targets)
    write_table(pa.table(columns), path)


def write_catalogue(prep: Prepared, out: Path) -> np.ndarray:
    n_items = len(prep.item_vocab)
    item_ids = np.arange(1, n_items + 1)
    freq = np.bincount(prep.items[prep.split.train_targets], minlength=n_items + 1)[1:]
    raw_items = prep.item_vocab.astype(str)
    titles = prep.titles.reindex(raw_items).fillna("").to_numpy().astype(str) if len(prep.titles) \
        else np.full(n_items, "")
    columns = {schema.ITEM: pa.array(item_ids, type=pa.int64()), schema.RAW_ID: pa.array(raw_items),
               schema.TITLE: pa.array(titles), schema.FREQ: pa.array(freq, type=pa.int64())}
    columns.update({name: feature_column(f, item_ids) for name, f in prep.item_features.items()})
    write_table(pa.table(columns), out / schema.ITEMS_FILE)
    user_ids = np.arange(1, len(prep.user_vocab) + 1)
    user_table = {schema.USER: pa.array(user_ids, type=pa.int64()),
                  schema.RAW_ID: pa.array(prep.user_vocab.astype(str))}
    user_table.update(user_columns(prep.user_features, user_ids))
    write_table(pa.table(user_table), out / schema.USERS_FILE)
    maps = out / schema.ID_MAPS_DIR
    maps.mkdir()
    vocabularies = {"item": prep.item_vocab, "user": prep.user_vocab}
    vocabularies.update({n: f["vocab"] for n, f in {**prep.item_features, **prep.user_features}.items()})
    vocabularies.update(CONTEXT_VOCABS)
    for name, vocab in vocabularies.items():
        pq.write_table(pa.table({"raw": pa.array(vocab.astype(str)),
                                 "id": pa.array(np.arange(1, len(vocab) + 1), type=pa.int64())}),
                       maps / f"{name}.parquet")
    return freq


def build(raw: RawData, cfg: SplitConfig, out: Path, seed: int, source: dict) -> schema.Metadata:
    """Writes the prepared layout into `out` (which must exist and be empty)."""
    with tqdm(total=5, desc="prepare", unit="step") as steps:
        prep = Prepared(raw, cfg)
        steps.update()
        train_files = write_train(prep, out, cfg, seed)
        sequence_lengths = write_sequences(prep, out)
        steps.update()
        write_eval(prep, prep.split.valid, out / schema.VALID_FILE, cfg)
        write_eval(prep, prep.split.test, out / schema.TEST_FILE, cfg)
        steps.update()
        write_catalogue(prep, out)
        steps.update()
        checksum, files = file_checksum(raw.files)
        train_lengths = np.minimum(prep.split.train_targets - prep.user_start[prep.split.train_targets],
                                   cfg.max_history)
        split = asdict(cfg)
        metadata = schema.Metadata(
            schema_version=schema.SCHEMA_VERSION,
            source={**source, **raw.params, "checksum": checksum, "files": files},
            split={"protocol": cfg.protocol, "valid_fraction": cfg.valid_fraction,
                   "test_fraction": cfg.test_fraction, "keep_cold_users": cfg.keep_cold_users,
                   "keep_cold_items": cfg.keep_cold_items, "seed": seed},
            filters={k: split[k] for k in ("min_user_events", "min_item_events", "min_positive_rating",
                                           "min_relevant_rating")},
            max_history=cfg.max_history,
            num_users=len(prep.user_vocab), num_items=len(prep.item_vocab),
            counts={"events": len(prep.users), "duplicate_rows": prep.filtered.duplicate_rows,
                    "dropped_events": prep.filtered.events, "dropped_users": prep.filtered.users,
                    "dropped_items": prep.filtered.items, "train_examples": len(prep.split.train_targets),
                    "valid_rows": len(prep.split.valid.users), "test_rows": len(prep.split.test.users),
                    "valid_dropped_users": prep.split.valid.dropped, "test_dropped_users": prep.split.test.dropped},
            repeats=prep.repeats,
            item_features=feature_specs(prep.item_features),
            user_features=feature_specs(prep.user_features),
            context_features=list(CONTEXT_SPECS) if prep.has_time else [],
            mean_history_length=float(train_lengths.mean()) if len(train_lengths) else 0.0,
            mean_sequence_length=float(sequence_lengths.mean()) if len(sequence_lengths) else 0.0,
            train_files=train_files,
        )
        metadata.save(out)
        steps.update()
    return metadata


def prepare(raw: RawData, cfg: SplitConfig, out: str | Path, seed: int = 0, overwrite: bool = False,
            source: dict | None = None) -> schema.Metadata:
    """Atomic: builds in a sibling temp directory, then renames it over `out`."""
    out = Path(out)
    check_output(out, overwrite)
    with atomic_directory(out) as tmp:
        return build(raw, cfg, tmp, seed, source or {})


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(out, None, "a directory to write the prepared dataset into (--out)", "an existing file")
    if out.exists() and not overwrite and any(out.iterdir()):
        raise DataError(out, None, "a new or empty output directory (or pass --overwrite)", "it has files")
    if out.parent.exists() and not out.parent.is_dir():
        raise DataError(out.parent, None, "a directory to hold --out", "an existing file")


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


def report(meta: schema.Metadata, out: str) -> list[str]:
    """What prepare did, in the words a user checks it by: counts, what was dropped, and repeats."""
    counts = meta.counts
    lines = [f"prepared {out}: {meta.num_users} users, {meta.num_items} items, {counts['train_examples']} "
             f"training examples, {counts['valid_rows']} validation and {counts['test_rows']} test queries"]
    if counts["duplicate_rows"]:
        lines.append(f"dropped {counts['duplicate_rows']} duplicate rows (the same user, item and time)")
    lines.append(f"filters (--min-user-events {meta.filters['min_user_events']}, --min-item-events "
                 f"{meta.filters['min_item_events']}) dropped {counts['dropped_users']} users, "
                 f"{counts['dropped_items']} items and {counts['dropped_events']} events")
    valid, test = meta.repeats["valid"], meta.repeats["test"]
    shares = [f"{percent(r['repeat_targets'], r['targets'])} of {name} targets ({r['repeat_targets']} of "
              f"{r['targets']})" for name, r in (("validation", valid), ("test", test))]
    lines.append(f"repeats: {shares[0]} and {shares[1]} were consumed earlier by the same user")
    if valid["repeat_targets"] or test["repeat_targets"]:
        lines.append(f"  with eval.filter_seen=true (the default) such targets cannot be ranked, so they are left "
                     f"out: {valid['queries_all_repeat']} validation and {test['queries_all_repeat']} test queries "
                     f"have no other target and are not evaluated. For domains where repeats are the point "
                     f"(music, grocery), train with eval.filter_seen=false")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    movielens = sub.add_parser("movielens", help="a MovieLens directory (100K, 1M, 10M, 20M, 25M, latest, "
                                                 "or the sequence copy of 1M)")
    movielens.add_argument("path")
    inter = sub.add_parser("interactions", help="a generic CSV/Parquet interactions table")
    inter.add_argument("path")
    inter.add_argument("--user-col", default="user")
    inter.add_argument("--item-col", default="item")
    inter.add_argument("--time-col", default="timestamp")
    inter.add_argument("--rating-col")
    inter.add_argument("--item-features", help="CSV/Parquet keyed by --item-col; other columns are features")
    inter.add_argument("--user-features", help="CSV/Parquet keyed by --user-col; other columns are features")
    inter.add_argument("--feature-sep", default="|", help="separator of multi-valued CSV features")
    inter.add_argument("--encoding", default="utf-8", help="text encoding of CSV files (e.g. latin-1)")
    seq = sub.add_parser("sequences", help="a 'user item item ...' file, optionally gzipped")
    seq.add_argument("path")
    seq.add_argument("--item-attributes", help='JSON {"item": [attribute, ...]}')
    seq.add_argument("--movies", help="MovieLens movies.dat for titles and genres")
    seq.add_argument("--users", help="MovieLens users.dat for user features")
    seq.add_argument("--string-ids", action="store_true", help="ids are arbitrary tokens, not integers")
    synth = sub.add_parser("synthetic", help="the generated default dataset (see data/synthetic.py)")
    synth.add_argument("--users", type=int, default=None)
    synth.add_argument("--items", type=int, default=None)
    synth.add_argument("--mean-events", type=float, default=None)
    synth.add_argument("--allow-repeats", action="store_true",
                       help="users may consume an item again (by default each user's items are distinct)")
    for p in (movielens, inter, seq, synth):
        p.add_argument("--out", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--protocol", choices=["leave_one_out", "time"], default="leave_one_out")
        p.add_argument("--max-history", type=int, default=SplitConfig.max_history)
        p.add_argument("--min-user-events", type=int, default=SplitConfig.min_user_events)
        p.add_argument("--min-item-events", type=int, default=SplitConfig.min_item_events)
        p.add_argument("--min-positive-rating", type=float)
        p.add_argument("--min-relevant-rating", type=float)
        p.add_argument("--valid-fraction", type=float, default=SplitConfig.valid_fraction)
        p.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction)
        p.add_argument("--keep-cold-users", action="store_true")
        p.add_argument("--keep-cold-items", action="store_true")
    return parser.parse_args(argv)


def load_source(args: argparse.Namespace) -> RawData:
    if args.source == "movielens":
        return read_movielens(args.path)
    if args.source == "interactions":
        return read_interactions(args.path, args.user_col, args.item_col, args.time_col, args.rating_col,
                                 args.item_features, args.user_features, feature_sep=args.feature_sep,
                                 encoding=args.encoding)
    if args.source == "sequences":
        raw = read_sequences(args.path, args.item_attributes, string_ids=args.string_ids)
        return with_side_tables(raw, Path(args.movies) if args.movies else None,
                                Path(args.users) if args.users else None, required=True)
    from data.synthetic import SyntheticConfig, generate

    overrides = {k: v for k, v in (("num_users", args.users), ("num_items", args.items),
                                   ("mean_events", args.mean_events)) if v is not None}
    return generate(SyntheticConfig(seed=args.seed, allow_repeats=args.allow_repeats, **overrides))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = SplitConfig(protocol=args.protocol, max_history=args.max_history,
                          min_user_events=args.min_user_events, min_item_events=args.min_item_events,
                          min_positive_rating=args.min_positive_rating,
                          min_relevant_rating=args.min_relevant_rating, valid_fraction=args.valid_fraction,
                          test_fraction=args.test_fraction, keep_cold_users=args.keep_cold_users,
                          keep_cold_items=args.keep_cold_items)
        check_output(Path(args.out), args.overwrite)
        raw = load_source(args)
        for warning in raw.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        source = {"kind": args.source, "path": getattr(args, "path", None), "seed": args.seed}
        metadata = prepare(raw, cfg, args.out, seed=args.seed, overwrite=args.overwrite, source=source)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report(metadata, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
