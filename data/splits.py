"""Filters and split protocols on dense, user-sorted event arrays.

Every function here is pure and vectorised; the result says, by event index, which events are
training targets and which users get a validation or test query with which relevant items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LEAVE_ONE_OUT = "leave_one_out"
TIME = "time"


@dataclass
class SplitConfig:
    protocol: str = LEAVE_ONE_OUT
    max_history: int = 50
    min_user_events: int = 5
    min_item_events: int = 1
    min_positive_rating: float | None = None
    min_relevant_rating: float | None = None
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    keep_cold_users: bool = False
    keep_cold_items: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in (LEAVE_ONE_OUT, TIME):
            raise ValueError(f"split protocol must be '{LEAVE_ONE_OUT}' or '{TIME}', got '{self.protocol}'")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if not (0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1
                and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("valid_fraction and test_fraction must be in (0, 1) and sum to less than 1")


@dataclass
class EvalQueries:
    """One row per user: the query is the events [user_start, cutoff); targets are relevant items."""

    users: np.ndarray
    cutoffs: np.ndarray  # exclusive event index; the history ends here
    target_lengths: np.ndarray
    targets: np.ndarray
    context_event: np.ndarray  # event index whose time is the query's context (its first target)
    dropped: int  # users with no relevant target (or cold, when dropped)


@dataclass
class Split:
    train_targets: np.ndarray  # event indices whose item is a training positive
    valid: EvalQueries
    test: EvalQueries


def repeat_targets(users: np.ndarray, items: np.ndarray, queries: EvalQueries) -> np.ndarray:
    """Per target of `queries` (flat, query-major): did the user consume that item before the query's
    cutoff? Such a target is in the query's seen set, so a seen-filtering evaluator can never rank it.
    Events must be sorted by user, then time."""
    if not len(queries.targets):
        return np.zeros(0, dtype=bool)
    stride = np.int64(items.max()) + 1
    pair = users.astype(np.int64) * stride + items
    unique, first = np.unique(pair, return_index=True)
    query_users = np.repeat(queries.users, queries.target_lengths)
    cutoffs = np.repeat(queries.cutoffs, queries.target_lengths)
    found = first[np.searchsorted(unique, query_users * stride + queries.targets)]
    return found < cutoffs


def core_filter(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Mask of events kept by iterated user/item minimum counts (the k-core the tutorials use)."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max() + 1)
        item_counts = np.bincount(items[keep], minlength=items.max() + 1)
        new_keep = keep & (user_counts[users] >= min_user) & (item_counts[items] >= min_item)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def user_bounds(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For user-sorted events: each event's user start index and the user's event count."""
    change = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [len(users)]]))
    return np.repeat(starts, counts), np.repeat(counts, counts)


def rating_ok(ratings: np.ndarray, minimum: float | None) -> np.ndarray:
    if minimum is None:
        return np.ones(len(ratings), dtype=bool)
    return np.nan_to_num(ratings, nan=np.inf) >= minimum


def leave_one_out(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, cfg: SplitConfig) -> Split:
    starts, counts = user_bounds(users)
    position = np.arange(len(users)) - starts
    relevant = rating_ok(ratings, cfg.min_relevant_rating)
    train = (position >= 1) & (position <= counts - 3) & rating_ok(ratings, cfg.min_positive_rating)

    def queries(offset_from_end: int) -> EvalQueries:
        target = np.flatnonzero(position == counts - offset_from_end)
        keep = target[relevant[target]]
        return EvalQueries(users=users[keep], cutoffs=keep, target_lengths=np.ones(len(keep), dtype=np.int64),
                           targets=items[keep], context_event=keep, dropped=len(target) - len(keep))

    return Split(np.flatnonzero(train), queries(2), queries(1))


def time_split(users: np.ndarray, items: np.ndarray, ts: np.ndarray, ratings: np.ndarray,
               cfg: SplitConfig) -> Split:
    """Global cutoffs by event-time quantiles; a user's query is everything before the cutoff."""
    valid_start = np.quantile(ts, 1 - cfg.valid_fraction - cfg.test_fraction, method="lower")
    test_start = np.quantile(ts, 1 - cfg.test_fraction, method="lower")
    starts, _ = user_bounds(users)
    position = np.arange(len(users)) - starts
    before_valid = ts < valid_start
    train = before_valid & (position >= 1) & rating_ok(ratings, cfg.min_positive_rating)
    relevant = rating_ok(ratings, cfg.min_relevant_rating)
    train_items = np.zeros(items.max() + 1, dtype=bool)
    train_items[items[before_valid]] = True

    def queries(lo, hi) -> EvalQueries:
        in_window = (ts >= lo) & (ts < hi) & relevant
        if not cfg.keep_cold_items:
            in_window &= train_items[items]
        # The cutoff of a user is the index of their first event at or after `lo` (events are time-sorted).
        first_in_window = np.flatnonzero((ts >= lo) & np.r_[True, (ts[:-1] < lo) | (users[1:] != users[:-1])])
        first_in_window = first_in_window[ts[first_in_window] >= lo]
        cutoff_of_user = np.full(users.max() + 1, -1, dtype=np.int64)
        cutoff_of_user[users[first_in_window]] = first_in_window
        target_idx = np.flatnonzero(in_window)
        window_users = np.unique(users[target_idx])
        cutoffs = cutoff_of_user[window_users]
        has_history = cutoffs > starts[cutoffs]
        all_users = np.unique(users[(ts >= lo) & (ts < hi)])
        keep = has_history | cfg.keep_cold_users
        window_users, cutoffs = window_users[keep], cutoffs[keep]
        mask = np.isin(users[target_idx], window_users)
        target_idx = target_idx[mask]
        # Unique relevant items per user, ordered by user (target_idx is already user-sorted).
        pairs = np.unique(np.stack([users[target_idx], items[target_idx]]), axis=1)
        lengths = np.bincount(np.searchsorted(window_users, pairs[0]), minlength=len(window_users))
        return EvalQueries(users=window_users, cutoffs=cutoffs, target_lengths=lengths, targets=pairs[1],
                           context_event=cutoffs, dropped=len(all_users) - len(window_users))

    return Split(np.flatnonzero(train), queries(valid_start, test_start), queries(test_start, np.inf))
