"""A seeded generator of interaction logs with the structure real ones have (SPEC §3.4).

- power-law item popularity;
- users with a few latent interests (topics), and user features that correlate with them;
- sequential drift: a user's current topic persists from one event to the next, so recent items
  predict the next one better than the whole history does;
- item features (genres, decade) correlated with the item's topic;
- by default no repeat consumption: a user's items are distinct (a draw of an item the user already
  has is dropped), like MovieLens, so every held-out target can be ranked by a seen-filtering
  evaluator. `allow_repeats=True` keeps the draws, for domains where repeats are the point.

It returns `RawData`, so the prepared layout comes from the same code path as real data.
Everything is vectorised over users (one loop step per sequence position), so millions of items
and users are fine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from data.sources.raw import RawSource, concat_features, event_schema, long_form, titles_table


@dataclass
class SyntheticConfig:
    num_users: int = 6000
    num_items: int = 3000
    num_topics: int = 24
    num_genres: int = 18
    max_interests: int = 3
    mean_events: float = 40.0
    min_events: int = 5
    zipf_exponent: float = 1.05
    topic_persistence: float = 0.8  # chance the next event stays in the current topic
    popularity_noise: float = 0.1  # chance an event ignores interests and follows global popularity
    allow_repeats: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < self.num_topics or self.num_topics < 1:
            raise ValueError("synthetic: need num_users >= 1 and num_items >= num_topics >= 1")
        if self.min_events < 3:
            raise ValueError("synthetic: min_events must be >= 3 (history, validation and test)")


def sample_within(cumulative: np.ndarray, lo: np.ndarray, hi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row from the items whose cumulative-weight span is [lo, hi): inverse-CDF, vectorised."""
    point = lo + rng.random(len(lo)) * (hi - lo)
    return np.minimum(np.searchsorted(cumulative, point, side="right"), len(cumulative) - 1)


def generate(cfg: SyntheticConfig) -> RawSource:
    rng = np.random.default_rng(cfg.seed)
    n_items, n_users, k = cfg.num_items, cfg.num_users, cfg.num_topics
    # Items sorted by topic, so each topic owns a contiguous span of the cumulative weight.
    topic_of_item = np.sort(rng.integers(0, k, n_items))
    topic_of_item[:k] = np.arange(k)
    topic_of_item.sort()
    weight = rng.permutation(np.arange(1, n_items + 1, dtype=np.float64) ** -cfg.zipf_exponent)
    cumulative = np.cumsum(weight)
    total = cumulative[-1]
    span_end = cumulative[np.searchsorted(topic_of_item, np.arange(k), side="right") - 1]
    span_start = np.r_[0.0, span_end[:-1]]

    interests = rng.integers(0, k, (n_users, cfg.max_interests))
    n_interests = rng.integers(1, cfg.max_interests + 1, n_users)
    lengths = cfg.min_events + rng.geometric(1.0 / max(cfg.mean_events - cfg.min_events, 1.0), n_users) - 1
    lengths = np.minimum(lengths, 20 * int(cfg.mean_events))
    max_len = int(lengths.max())

    topic = interests[:, 0].copy()
    items = np.zeros((n_users, max_len), dtype=np.int64)
    for step in range(max_len):
        switch = rng.random(n_users) > cfg.topic_persistence
        choice = interests[np.arange(n_users), rng.integers(0, n_interests)]
        topic = np.where(switch, choice, topic)
        draw = sample_within(cumulative, span_start[topic], span_end[topic], rng)
        noise = rng.random(n_users) < cfg.popularity_noise
        global_draw = sample_within(cumulative, np.zeros(n_users), np.full(n_users, total), rng)
        items[:, step] = np.where(noise, global_draw, draw)

    valid = np.arange(max_len)[None, :] < lengths[:, None]
    user_of_event = np.broadcast_to(np.arange(n_users)[:, None], items.shape)[valid]
    gaps = rng.exponential(6 * 3600.0, items.shape).cumsum(axis=1)
    start = 1_600_000_000 + rng.integers(0, 180 * 86400, n_users)
    ts = (start[:, None] + gaps).astype(np.int64)[valid]
    event_items = items[valid]
    if not cfg.allow_repeats:  # a user's first draw of an item stays
        _, first = np.unique(user_of_event.astype(np.int64) * n_items + event_items, return_index=True)
        keep = np.sort(first)
        user_of_event, event_items, ts = user_of_event[keep], event_items[keep], ts[keep]
    events = pa.table([pa.array(user_of_event, pa.int64()), pa.array(event_items, pa.int64()), pa.array(ts),
                       pa.nulls(len(ts), pa.float64()), pa.array(np.arange(len(ts), dtype=np.int64))],
                      schema=event_schema(pa.int64(), pa.int64()))

    item_ids = pa.array(np.arange(n_items).astype(str))
    main_genre = topic_of_item % cfg.num_genres
    extra = rng.integers(0, cfg.num_genres, n_items)
    has_extra = rng.random(n_items) < 0.5
    genres = np.char.add(np.char.add("g", main_genre.astype(str)), np.where(has_extra, np.char.add("|g", extra.astype(
        str)), ""))
    decade = 1950 + 10 * ((topic_of_item * 7 + rng.integers(0, 2, n_items)) % 7)
    item_features = concat_features([
        long_form(item_ids, "i_genre", pa.array(genres), sep="|"),
        long_form(item_ids, "i_decade", pa.array(np.char.add(decade.astype(str), "s"))),
    ])
    user_ids = pa.array(np.arange(n_users).astype(str))
    age = (interests[:, 0] * 3 + rng.integers(0, 2, n_users)) % 7
    user_features = concat_features([
        long_form(user_ids, "u_gender", pa.array(np.where(interests[:, 0] % 2 == 0, "F", "M"))),
        long_form(user_ids, "u_age", pa.array(age.astype(str))),
        long_form(user_ids, "u_occupation", pa.array(rng.integers(0, 21, n_users).astype(str))),
    ])
    titles = np.char.add(np.char.add(np.char.add("Item ", np.arange(n_items).astype(str)), " (topic "),
                         np.char.add(topic_of_item.astype(str), ")"))
    params = asdict(cfg)
    return RawSource("synthetic", [], pa.int64(), pa.int64(), has_time=True, has_rating=False,
                     origin={"user": "synthetic:user", "item": "synthetic:item", "ts": "synthetic:ts"}, files=[],
                     item_features=item_features, user_features=user_features,
                     titles=titles_table(item_ids, pa.array(titles)), multi_valued={"i_genre"}, params=params,
                     events=events)

