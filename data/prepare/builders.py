"""The per-user outputs of the plan, built with numpy from one chunk of whole users at a time: the training rows
(each target with its history), the training sequences, and the evaluation queries (history, seen items and
targets). Both engines call these same functions, each on its own chunks: the embedded engine in this process,
Spark inside `applyInArrow` on its executors.

A chunk's events arrive as an Arrow table `user, item, ts, pos, is_train` (whole users: every event of each);
its users' rows as `user` plus the user features (the training and sequence rows) or the queries' `cutoff,
context_ts, targets` plus the user features (the evaluation rows). Everything is vectorised over the chunk: no
per-row Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data import schema
from data.ragged import gather_csr, gather_ragged, list_array, list_offsets_values

PRIME = 2_147_483_647  # the shuffle hash's modulus: products of two values below it stay below 2**62
CONTEXT = ("c_hour", "c_dow")
LIST = pa.list_(pa.int64())


@dataclass(frozen=True)
class Shape:
    """What the builders need from the plan (small and picklable, for Spark's executors)."""

    max_history: int
    has_time: bool
    user_features: tuple[tuple[str, bool], ...]  # (name, is a list), in the layout's column order
    train_files: int  # parts of the training rows, chosen by hash
    chunks: int  # parts of the per-user outputs, by user range
    users: int
    seed: int


def chunk_of(users: np.ndarray, shape: Shape) -> np.ndarray:
    """The part of each user in the per-user outputs: contiguous ranges of dense user ids (`user_ranges`)."""
    return (users - 1) * shape.chunks // max(shape.users, 1)


def user_ranges(users: int, groups: int) -> list[tuple[int, int]]:
    """Dense user ids 1..users in `groups` contiguous ranges: user u is in range (u - 1) * groups // users."""
    starts = [-(-g * users // groups) + 1 for g in range(groups + 1)]
    return [(starts[g], starts[g + 1] - 1) for g in range(groups)]


def mix(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A seeded hash of two non-negative integer arrays into [0, 2**31 - 1): a linear start, then xor-shift and
    multiply rounds modulo a prime. Integer arithmetic only, so every machine computes the same shuffle."""
    h = ((a % PRIME) * 48271 + (b % PRIME) * 69621 + seed % PRIME) % PRIME
    for shift, multiplier in ((15, 1_103_515_245), (13, 2_147_483_629)):
        h = h ^ (h >> shift)
        h = (h * multiplier) % PRIME
    return h ^ (h >> 16)


def context(ts: np.ndarray) -> dict[str, np.ndarray]:
    """Hour of day and day of week (1-based; 0 is the pad id), as CONTEXT_VOCABS name them."""
    seconds = np.mod(ts, 86_400)
    return {"c_hour": seconds // 3_600 + 1, "c_dow": np.mod((ts - seconds) // 86_400 + 3, 7) + 1}


def sorted_events(events: pa.Table) -> dict[str, np.ndarray]:
    """The chunk's events as arrays in (user, position) order."""
    user, pos = events.column("user").to_numpy(), events.column("pos").to_numpy()
    if len(user) > 1 and not np.all((np.diff(user) > 0) | ((np.diff(user) == 0) & (np.diff(pos) > 0))):
        events = events.take(pc.sort_indices(events, [("user", "ascending"), ("pos", "ascending")]))
    return {name: events.column(name).to_numpy(zero_copy_only=False)
            for name in ("user", "item", "ts", "pos", "is_train")}


def user_features(users: pa.Table, rows: np.ndarray, shape: Shape) -> dict[str, pa.Array]:
    """Each feature of the users of `rows` (`users` holds every one of them, in any order)."""
    keys = users.column("user").to_numpy()
    if len(keys) > 1 and not np.all(np.diff(keys) > 0):
        users = users.sort_by("user")
        keys = users.column("user").to_numpy()
    index = np.searchsorted(keys, rows)
    out = {}
    for name, multi in shape.user_features:
        column = users.column(name)
        if multi:
            offsets, values = list_offsets_values(column)
            lengths, gathered = gather_csr(offsets, values, index)
            out[name] = list_array(lengths, gathered)
        else:
            out[name] = pa.array(column.to_numpy()[index], pa.int64())
    return out


def train_rows(events: pa.Table, users: pa.Table, shape: Shape) -> pa.Table:
    """One row per training target: its history (the user's previous max_history items, newest last), user and
    context features, and the part (`_bucket`) and place (`_order`, `_pos`) of the training shuffle; in the
    order of (`_bucket`, `_order`, user, `_pos`)."""
    e = sorted_events(events)
    rows = np.flatnonzero(e["is_train"])
    user, pos = e["user"][rows], e["pos"][rows]
    bucket, order = mix(user, pos, shape.seed) % shape.train_files, mix(user, pos, shape.seed + 1)
    # Rows in (part, place) order, so that the shuffle slices them into its parts without another copy.
    rank = np.lexsort((pos, user, order, bucket))
    rows, user, pos, bucket, order = rows[rank], user[rank], pos[rank], bucket[rank], order[rank]
    lengths = np.minimum(pos, shape.max_history)
    columns = {schema.USER: pa.array(user, pa.int64()),
               schema.HISTORY: list_array(lengths, gather_ragged(e["item"], rows - lengths, lengths))}
    columns.update(user_features(users, user, shape))
    if shape.has_time:
        columns.update({k: pa.array(v, pa.int64()) for k, v in context(e["ts"][rows]).items()})
    columns[schema.TARGET] = pa.array(e["item"][rows], pa.int64())
    columns[schema.TIMESTAMP] = pa.array(e["ts"][rows], pa.int64())
    columns["_bucket"] = pa.array(bucket, pa.int64())
    columns["_order"] = pa.array(order, pa.int64())
    columns["_pos"] = pa.array(pos, pa.int64())
    return pa.table(columns)


def user_starts(user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct users, index of each one's first event) of user-sorted events."""
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, np.int64)
    return user[starts], starts


def sequence_rows(events: pa.Table, users: pa.Table, shape: Shape) -> pa.Table:
    """One row per user with a training target: their events up to the last one, which of them are targets (the
    item, else 0), their user features and each event's context; in user order."""
    e = sorted_events(events)
    ids, starts = user_starts(e["user"])
    last = np.maximum.reduceat(np.where(e["is_train"], e["pos"], -1), starts) if len(starts) else starts
    keep = last >= 0
    ids, starts, lengths = ids[keep], starts[keep], last[keep] + 1
    labels = np.where(e["is_train"], e["item"], 0)
    columns = {schema.USER: pa.array(ids, pa.int64()),
               schema.SEQUENCE_ITEMS: list_array(lengths, gather_ragged(e["item"], starts, lengths)),
               schema.SEQUENCE_TARGETS: list_array(lengths, gather_ragged(labels, starts, lengths))}
    columns.update(user_features(users, ids, shape))
    if shape.has_time:
        times = gather_ragged(e["ts"], starts, lengths)
        columns.update({k: list_array(lengths, v) for k, v in context(times).items()})
        columns[schema.SEQUENCE_TIMES] = list_array(lengths, times)
    columns["_bucket"] = pa.array(chunk_of(ids, shape), pa.int64())
    return pa.table(columns)


def eval_rows(events: pa.Table, queries: pa.Table, shape: Shape) -> pa.Table:
    """One row per query (`queries`: user, cutoff, context_ts, targets and the user features, sorted by user):
    the history (the last max_history items before the cutoff), user and context features, every item seen
    before the cutoff (for filtering) and the targets."""
    e = sorted_events(events)
    queries = queries.sort_by("user")
    ids, starts = user_starts(e["user"])
    user = queries.column("user").to_numpy()
    first = starts[np.searchsorted(ids, user)]
    cutoff = queries.column("cutoff").to_numpy()
    seen = gather_ragged(e["item"], first, cutoff)
    recent = np.minimum(cutoff, shape.max_history)
    columns = {schema.USER: pa.array(user, pa.int64()),
               schema.HISTORY: list_array(recent, gather_ragged(e["item"], first + cutoff - recent, recent))}
    columns.update({name: queries.column(name).combine_chunks() for name, _ in shape.user_features})
    if shape.has_time:
        times = queries.column("context_ts").to_numpy()
        columns.update({k: pa.array(v, pa.int64()) for k, v in context(times).items()})
        columns[schema.HISTORY_TIMES] = list_array(recent, gather_ragged(e["ts"], first + cutoff - recent, recent))
        columns[schema.TIMESTAMP] = pa.array(times, pa.int64())
    columns[schema.SEEN] = list_array(cutoff, seen)
    columns[schema.TARGETS] = queries.column(schema.TARGETS).combine_chunks().cast(LIST)
    columns["_bucket"] = pa.array(chunk_of(user, shape), pa.int64())
    return pa.table({k: (v.cast(LIST) if pa.types.is_list(v.type) else v) for k, v in columns.items()})


def output_schema(kind: str, shape: Shape) -> pa.Schema:
    """The columns each builder returns (what Spark is told its function yields)."""
    features = [(name, LIST if multi else pa.int64()) for name, multi in shape.user_features]
    context_scalars = [(name, pa.int64()) for name in CONTEXT] if shape.has_time else []
    if kind == "train":
        fields = ([(schema.USER, pa.int64()), (schema.HISTORY, LIST)] + features + context_scalars
                  + [(schema.TARGET, pa.int64()), (schema.TIMESTAMP, pa.int64()), ("_bucket", pa.int64()),
                     ("_order", pa.int64()), ("_pos", pa.int64())])
    elif kind == "sequences":
        fields = ([(schema.USER, pa.int64()), (schema.SEQUENCE_ITEMS, LIST), (schema.SEQUENCE_TARGETS, LIST)]
                  + features + ([(name, LIST) for name in CONTEXT] + [(schema.SEQUENCE_TIMES, LIST)]
                                if shape.has_time else [])
                  + [("_bucket", pa.int64())])
    else:
        times = [(schema.HISTORY_TIMES, LIST), (schema.TIMESTAMP, pa.int64())] if shape.has_time else []
        fields = ([(schema.USER, pa.int64()), (schema.HISTORY, LIST)] + features + context_scalars + times
                  + [(schema.SEEN, LIST), (schema.TARGETS, LIST), ("_bucket", pa.int64())])
    return pa.schema(fields)


BUILDERS = {"train": train_rows, "sequences": sequence_rows, "eval": eval_rows}


def build(kind: str, shape: Shape, events: pa.Table, side: pa.Table) -> pa.Table:
    """The rows `kind` makes from one chunk, cast to `output_schema` (the types both engines write)."""
    rows = BUILDERS[kind](events, side, shape)
    target = output_schema(kind, shape)
    return pa.table([rows.column(f.name).cast(f.type) for f in target], schema=target)
