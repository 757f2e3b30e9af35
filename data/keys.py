"""The feature-key contract: every KeyedJaggedTensor key and the query layout, spelled here only.

The loader, the model's tables, the planner, serving and the benchmark all build keys and queries
through this module, so a query is assembled one way everywhere. It imports numpy and our ragged
helpers only (no torch), so serving can use it without TorchRec.

Keys: `hist_all` / `hist_last{k}` pool the whole history / its last k items; `hist_seq` is the history
unpooled, for the transformer tower; `user_id` is the user's
own id (optional); user and context features keep their prepared names (`u_*`, `c_*`); the candidate
side is `cand_item` plus `cand_<item feature>`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.ragged import gather_ragged
from data.schema import Metadata

HISTORY_ALL = "hist_all"
HISTORY_LAST = "hist_last"
USER_ID = "user_id"
SEQUENCE_KEY = "hist_seq"  # transformer tower: the history, unpooled, in the EmbeddingCollection
CANDIDATE_PREFIX = "cand_"
ITEM_KEY = CANDIDATE_PREFIX + "item"

Jagged = tuple[np.ndarray, np.ndarray]  # (lengths, values) of one key over a batch's rows


def last_items(history: Jagged, rows: np.ndarray, max_len: int) -> Jagged:
    """(lengths, values) of the last `max_len` items of each row's history, oldest first: the transformer's
    query input. `history` is CSR (offsets, values) over a block."""
    offsets, values = history
    lengths = np.minimum(offsets[rows + 1] - offsets[rows], max_len)
    return lengths, gather_ragged(values, offsets[rows + 1] - lengths, lengths)


def history_key(last_k: int) -> str:
    """Feature key of the history bag over the last k items (0 = the whole history)."""
    return HISTORY_ALL if last_k == 0 else f"{HISTORY_LAST}{last_k}"


def history_window(key: str) -> int | None:
    """The inverse of `history_key`: k of a history key (0 for all), None for any other key."""
    if key == HISTORY_ALL:
        return 0
    if key.startswith(HISTORY_LAST) and key[len(HISTORY_LAST):].isdigit():
        return int(key[len(HISTORY_LAST):])
    return None


def candidate_key(item_feature: str) -> str:
    return CANDIDATE_PREFIX + item_feature


def candidate_feature(key: str) -> str | None:
    """The item feature behind a candidate key (None for the item id and for query keys)."""
    return key[len(CANDIDATE_PREFIX):] if key.startswith(CANDIDATE_PREFIX) and key != ITEM_KEY else None


def candidate_keys(item_features: list[str]) -> list[str]:
    return [ITEM_KEY] + [candidate_key(name) for name in item_features]


@dataclass(frozen=True)
class QueryLayout:
    """The query tower's keys, in batch order, and how each is built from a user's history and features."""

    history_bags: tuple[int, ...]
    use_user_id: bool
    features: tuple[tuple[str, bool], ...]  # user and context features: (name, is a list)

    @classmethod
    def of(cls, history_bags, use_user_id: bool, features) -> "QueryLayout":
        return cls(tuple(history_bags), use_user_id, tuple((name, bool(multi)) for name, multi in features))

    @classmethod
    def for_data(cls, meta: Metadata, history_bags, use_user_id: bool) -> "QueryLayout":
        """The layout of a prepared dataset: every user feature, then every context feature."""
        features = meta.user_features + meta.context_features
        return cls.of(history_bags, use_user_id, [(f.name, f.multi) for f in features])

    @property
    def multi(self) -> list[bool]:
        """Whether each non-history key (the user id, then the features) is a list."""
        return [False] * self.use_user_id + [is_list for _, is_list in self.features]

    @property
    def keys(self) -> list[str]:
        keys = [history_key(k) for k in self.history_bags]
        keys += [USER_ID] if self.use_user_id else []
        return keys + [name for name, _ in self.features]

    def arrays(self, history: Jagged, users: np.ndarray, features: dict[str, np.ndarray | Jagged],
               rows: np.ndarray) -> list[Jagged]:
        """(lengths, values) per key for `rows` of a block: `history` is CSR (offsets, values) over the
        block, newest item last; `features` maps each name to a scalar column or CSR (offsets, values)."""
        offsets, values = history
        lengths = offsets[rows + 1] - offsets[rows]
        out = []
        for k in self.history_bags:
            bag = lengths if k == 0 else np.minimum(lengths, k)
            out.append((bag, gather_ragged(values, offsets[rows + 1] - bag, bag)))
        ones = np.ones(len(rows), dtype=np.int64)
        if self.use_user_id:
            out.append((ones, users[rows]))
        for name, multi in self.features:
            column = features[name]
            if multi:
                feature_offsets, feature_values = column
                feature_lengths = feature_offsets[rows + 1] - feature_offsets[rows]
                out.append((feature_lengths, gather_ragged(feature_values, feature_offsets[rows], feature_lengths)))
            else:
                out.append((ones, column[rows]))
        return out

    def single(self, history: list[int], features: dict[str, list[int]], user: int, max_history: int,
               pad_id: int) -> list[Jagged]:
        """One query from ids (history oldest first, only its last `max_history` items count, as in the
        prepared data); a feature not given is the padding id (an empty list for list features)."""
        history = np.asarray(history[-max_history:], dtype=np.int64)
        columns: dict[str, np.ndarray | Jagged] = {}
        for name, multi in self.features:
            given = np.asarray(features.get(name, []), dtype=np.int64)
            columns[name] = (np.array([0, len(given)]), given) if multi else (given[:1] if len(given) else
                                                                              np.array([pad_id]))
        return self.arrays((np.array([0, len(history)]), history), np.array([user], dtype=np.int64), columns,
                           np.zeros(1, dtype=np.int64))
