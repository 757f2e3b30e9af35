"""The preparation logic, expressed once and run by both engines:

    raw events -> duplicates dropped -> user/item minimums (iterated) -> dense ids -> positions per user
    -> split (leave-one-out or time) -> catalogue with training counts, users, id maps        (SQL, here)
    -> training rows with their history, training sequences, evaluation queries               (builders.py)
    -> metadata.json

The relational steps are SQL both engines run (dialect.py spells the few differences); the per-user list outputs
are numpy builders both call on chunks of whole users. Dense ids are 1..n in the order of the raw ids as text
(0 is padding); a user's events are ordered by time, then by their place in the source. Every order is total
and the training rows' shuffle is an integer hash of (user, position, seed), so the two engines write the same
rows for the same input.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import asdict

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from data import schema
from data.errors import DataError
from data.prepare.builders import Shape
from data.prepare.engine import ROWS_PER_FILE, Engine, Output, Written
from data.prepare.split_sql import empty_split_hints, kth_smallest_time, repeat_counts, time_queries
from data.sources.raw import PART_BITS, RawSource, coverage_warning
from data.splits import LEAVE_ONE_OUT, MIN_EVENTS_LEAVE_ONE_OUT, SplitConfig, filters_in_force
from storage.commit import Staging

CONTEXT_SPECS = [schema.FeatureSpec("c_hour", 25, False), schema.FeatureSpec("c_dow", 8, False)]
# What serving is sent for them (`recommend --user-features c_hour=14,c_dow=Sat`): raw value i has id i + 1.
CONTEXT_VOCABS = {"c_hour": [str(h) for h in range(24)], "c_dow": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}
STEPS = ("load", "filter", "split", "catalogue", "train", "sequences", "eval", "metadata")
# Events per chunk of users: what a builder gets at once (data/prepare/builders.py), and about the events behind
# each part of the sequence and query files.
CHUNK_EVENTS = 2_000_000
CHUNK_VALUES = 8_000_000  # history values and rows of training rows built, or held in one part, at once (64 MB)


def parts_needed(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_FILE))


class Plan:
    """One preparation: `run()` writes the prepared layout into `staging` and returns its metadata."""

    def __init__(self, engine: Engine, source: RawSource, cfg: SplitConfig, seed: int, staging: Staging,
                 source_info: dict):
        self.engine, self.d, self.source, self.cfg, self.seed = engine, engine.dialect, source, cfg, seed
        self.staging, self.info = staging, source_info
        self.origin = source.origin.get("user", "input").rsplit(":", 1)[0]
        self.counts: dict[str, int] = {}
        self.warnings: list[str] = []
        self.files: dict[str, list[str]] = {}

    # SQL fragments

    def rating_ok(self, minimum: float | None) -> str:
        return "TRUE" if minimum is None else f"(rating IS NULL OR rating >= {float(minimum)!r})"

    def train_condition(self) -> str:
        positive = self.rating_ok(self.cfg.min_positive_rating)
        if self.cfg.protocol == LEAVE_ONE_OUT:
            return f"(pos >= 1 AND pos <= n - 3 AND {positive})"
        return f"(ts < {self.valid_start} AND pos >= 1 AND {positive})"

    def scalar(self, sql: str):
        return self.engine.rows(sql)[0][0]

    # steps

    def run(self) -> schema.Metadata:
        with tqdm(total=len(STEPS), desc="prepare", unit="step") as bar:
            for step in STEPS:
                bar.set_postfix_str(step, refresh=False)
                getattr(self, f"step_{step}")()
                bar.update()
        return self.metadata

    def step_load(self) -> None:
        e = self.engine
        e.load_events(self.source)
        self.counts["raw_events"] = self.scalar("SELECT count(*) FROM raw_events")
        if self.counts["raw_events"] == 0:
            raise DataError(self.origin, None, "at least one row", "no rows")
        if any(p.reader == "sequences" for p in self.source.parts):
            self.check_one_line_per_user()
        for coverage in self.source.coverage:
            self.warnings.append(self.coverage(coverage))
        self.warnings = [w for w in self.warnings if w]

    def check_one_line_per_user(self) -> None:
        """A user on two lines of different parts (the reader catches two lines of one part itself)."""
        twice = self.engine.rows(f"SELECT {self.d.text('user')}, min(src), max(src) FROM raw_events WHERE ts = 0 "
                                 f"GROUP BY user HAVING count(*) > 1 ORDER BY 1 LIMIT 1")
        if twice:
            user, lo, hi = twice[0]
            parts = {p.index: p.uri for p in self.source.parts}
            raise DataError(parts[lo >> PART_BITS], "user", "one line per user (the order of a user's events would "
                                                            "be undefined)",
                            f"user '{user}' also in {parts[hi >> PART_BITS]}")

    def coverage(self, coverage) -> str | None:
        if coverage.keys is None:
            return coverage_warning(coverage, [], 0)
        column = coverage.kind
        self.engine.load_arrow("coverage_keys", pa.table({"key": coverage.keys.cast(pa.string())}))
        missing = (f"SELECT DISTINCT {self.d.text(column)} AS k FROM raw_events e WHERE NOT EXISTS "
                   f"(SELECT 1 FROM coverage_keys c WHERE c.key = {self.d.text('e.' + column)})")
        count = self.scalar(f"SELECT count(*) FROM ({missing}) m")
        examples = [r[0] for r in self.engine.rows(f"SELECT k FROM ({missing}) m ORDER BY length(k), k LIMIT 5")]
        self.engine.drop("coverage_keys")
        return coverage_warning(coverage, examples, count)

    def step_filter(self) -> None:
        e, cfg = self.engine, self.cfg
        e.create("dedup", "SELECT user, item, ts, min_by(rating, src) AS rating, min(src) AS src FROM raw_events "
                          "GROUP BY user, item, ts")
        e.drop("raw_events")
        self.counts["dedup"] = self.scalar("SELECT count(*) FROM dedup")
        e.create("user_counts", "SELECT user, count(*) AS c FROM dedup GROUP BY user")
        self.counts["users_before"], self.counts["items_before"] = e.rows(
            "SELECT (SELECT count(*) FROM user_counts), (SELECT count(DISTINCT item) FROM dedup)")[0]
        if cfg.min_item_events <= 1:
            # One round is the fixpoint: dropping a user's events never lowers another user's count. The users with
            # enough events are kept with every item they consumed (their vocabulary's join drops the others).
            current = "dedup"
            self.vocabulary("user", f"SELECT user FROM user_counts WHERE c >= {cfg.min_user_events}")
            self.vocabulary("item", "SELECT DISTINCT d.item FROM dedup d JOIN user_vocab u ON d.user = u.key")
            size = self.scalar(f"SELECT coalesce(sum(c), 0) FROM user_counts WHERE c >= {cfg.min_user_events}")
        else:
            current, size = self.iterated_minimums()
            if size:
                self.vocabulary("user", f"SELECT DISTINCT user FROM {current}")
                self.vocabulary("item", f"SELECT DISTINCT item FROM {current}")
        if size == 0:
            most_user = self.scalar("SELECT max(c) FROM user_counts")
            most_item = self.scalar("SELECT max(c) FROM (SELECT count(*) AS c FROM dedup GROUP BY item) t")
            raise DataError(self.origin, None, f"events left after the filters ({filters_in_force(cfg)}; user and "
                                               f"item minimums are applied together until both hold)",
                            f"none: the most active user has {most_user} events and the most consumed item "
                            f"{most_item}")
        self.counts.update(events=size, users=self.scalar("SELECT count(*) FROM user_vocab"),
                           items=self.scalar("SELECT count(*) FROM item_vocab"))
        self.chunks = max(1, math.ceil(size / CHUNK_EVENTS))
        e.create("events", f"SELECT u.id AS user, i.id AS item, k.ts, k.rating, k.src, "
                           f"CAST(row_number() OVER (PARTITION BY u.id ORDER BY k.ts, k.src) - 1 AS BIGINT) AS pos, "
                           f"CAST(count(*) OVER (PARTITION BY u.id) AS BIGINT) AS n "
                           f"FROM {current} k JOIN user_vocab u ON k.user = u.key JOIN item_vocab i ON k.item = i.key",
                 order=("user", "pos"))
        e.drop(*({"dedup", "user_counts", current}))

    def vocabulary(self, kind: str, keys: str) -> None:
        """Dense ids 1..n of the raw ids `keys` selects (one column), in the order of their text."""
        text = self.d.text(kind)
        self.engine.create(f"{kind}_vocab", f"SELECT {kind} AS key, {text} AS raw, CAST(row_number() OVER (ORDER BY "
                                            f"{text}) AS BIGINT) AS id FROM ({keys}) v")

    def iterated_minimums(self) -> tuple[str, int]:
        """User and item minimums applied together until both hold (the k-core): the table of surviving events
        and their number."""
        cfg, e = self.cfg, self.engine
        current, size = "dedup", self.counts["dedup"]
        for round_ in itertools.count():
            name = f"kept_{round_}"
            e.create(name, f"SELECT * FROM {current} WHERE user IN (SELECT user FROM {current} GROUP BY user "
                           f"HAVING count(*) >= {cfg.min_user_events}) AND item IN (SELECT item FROM {current} "
                           f"GROUP BY item HAVING count(*) >= {cfg.min_item_events})")
            if current != "dedup":
                e.drop(current)
            current, previous = name, size
            size = self.scalar(f"SELECT count(*) FROM {current}")
            if size == previous:
                return current, size

    def step_split(self) -> None:
        e, cfg = self.engine, self.cfg
        if cfg.protocol == LEAVE_ONE_OUT:
            short = e.rows(f"SELECT count(DISTINCT user), min(user) FROM events WHERE n < {MIN_EVENTS_LEAVE_ONE_OUT}")
            if short[0][0]:
                user = short[0][1]
                raw, count = e.rows(f"SELECT v.raw, (SELECT min(n) FROM events WHERE user = {user}) FROM user_vocab v "
                                    f"WHERE v.id = {user}")[0]
                path, column = self.source.origin["user"].rsplit(":", 1)
                raise DataError(path, column, f"at least {MIN_EVENTS_LEAVE_ONE_OUT} events per user for leave-one-out "
                                              f"(history, validation, test); raise --min-user-events to drop such "
                                              f"users",
                                f"{short[0][0]} users with fewer, e.g. user '{raw}' with {count}")
            relevant = self.rating_ok(cfg.min_relevant_rating)
            for split, offset in (("valid", 2), ("test", 1)):
                e.create(f"q_{split}", f"SELECT user, pos AS cutoff, ts AS context_ts, item AS target FROM events "
                                       f"WHERE pos = n - {offset} AND {relevant}")
                self.counts[f"{split}_dropped_users"] = self.scalar(
                    f"SELECT count(*) FROM events WHERE pos = n - {offset} AND NOT {relevant}")
        else:
            if not self.source.has_time:
                raise DataError(self.origin, None, "event times for --protocol time",
                                "positions only (a sequence file has no clock): use --protocol leave_one_out")
            n = self.counts["events"]
            self.valid_start = self.quantile(n, 1 - cfg.valid_fraction - cfg.test_fraction)
            self.test_start = self.quantile(n, 1 - cfg.test_fraction)
            self.time_queries("valid", self.valid_start, self.test_start)
            self.time_queries("test", self.test_start, None)
        e.create("train_targets", f"SELECT user, pos, item FROM events WHERE {self.train_condition()}")
        self.counts["train_examples"] = self.scalar("SELECT count(*) FROM train_targets")
        for split in ("valid", "test"):
            self.counts[f"{split}_rows"] = self.scalar(f"SELECT count(DISTINCT user) FROM q_{split}")
        self.check_splits()
        self.repeats = {split: self.repeat_summary(split) for split in ("valid", "test")}

    def quantile(self, n: int, q: float) -> int:
        """numpy's quantile(ts, q, method="lower"): the k-th smallest time, k = floor((n - 1) q), from a histogram
        of times (no global sort of the events)."""
        return int(self.scalar(kth_smallest_time(int(np.floor((n - 1) * q)))))

    def time_queries(self, split: str, lo: int, hi: int | None) -> None:
        """A query per user with a relevant event in [lo, hi): their history before their first event at or after
        `lo`, their relevant items in the window as targets (items never seen before the validation window are
        cold and left out, unless kept)."""
        cfg = self.cfg
        window = f"ts >= {lo}" + (f" AND ts < {hi}" if hi is not None else "")
        self.engine.create(f"q_{split}", time_queries(window, lo, self.rating_ok(cfg.min_relevant_rating),
                                                                cfg.keep_cold_items, cfg.keep_cold_users,
                                                                self.valid_start))
        active = self.scalar(f"SELECT count(DISTINCT user) FROM events WHERE {window}")
        self.counts[f"{split}_dropped_users"] = active - self.scalar(f"SELECT count(DISTINCT user) FROM q_{split}")

    def check_splits(self) -> None:
        """Every split must hold something; otherwise name the split and the filters that emptied it."""
        cfg = self.cfg
        hints = empty_split_hints(cfg.protocol == LEAVE_ONE_OUT, self.scalar("SELECT max(n) FROM events"))
        sizes = {"training": self.counts["train_examples"], "validation": self.counts["valid_rows"],
                 "test": self.counts["test_rows"]}
        for name, size in sizes.items():
            if size == 0:
                raise DataError(self.origin, None, f"a non-empty {name} split",
                                f"none: {hints[name]}; filters in force: {filters_in_force(cfg)}")

    def repeat_summary(self, split: str) -> dict:
        """How many targets the user had consumed before the query, and how many queries have nothing else."""
        targets, repeat, all_repeat = self.engine.rows(repeat_counts(split))[0]
        return {"queries": self.counts[f"{split}_rows"], "targets": int(targets), "repeat_targets": int(repeat),
                "repeat_share": float(repeat / targets) if targets else 0.0, "queries_all_repeat": int(all_repeat)}

    def step_catalogue(self) -> None:
        """Items (raw id, title, training count, features), users (raw id, features), and the id maps."""
        e = self.engine
        e.load_arrow("item_feature_rows", self.source.item_features)
        e.load_arrow("user_feature_rows", self.source.user_features)
        e.load_arrow("titles", self.source.titles)
        self.item_specs, item_columns = self.encode("item")
        self.user_specs, user_columns = self.encode("user")
        e.create("freq", "SELECT item, count(*) AS freq FROM train_targets GROUP BY item")
        joins = " ".join(f"LEFT JOIN fv_item_{n} ON fv_item_{n}.id = v.id" for n, _ in item_columns)
        e.create("item_table",
                 f"SELECT v.id AS item, v.raw AS raw_id, coalesce(t.title, '') AS title, coalesce(f.freq, 0) AS freq"
                 f"{''.join(f', {sql}' for _, sql in item_columns)} FROM item_vocab v "
                 f"LEFT JOIN (SELECT item, min(title) AS title FROM titles GROUP BY item) t ON t.item = v.raw "
                 f"LEFT JOIN freq f ON f.item = v.id {joins}")
        joins = " ".join(f"LEFT JOIN fv_user_{n} ON fv_user_{n}.id = v.id" for n, _ in user_columns)
        e.create("user_table", f"SELECT v.id AS user, v.raw AS raw_id{''.join(f', {sql}' for _, sql in user_columns)} "
                               f"FROM user_vocab v {joins}")
        self.write("SELECT * FROM item_table", Output(schema.ITEMS_FILE, ("item",)))
        self.write("SELECT * FROM user_table", Output(schema.USERS_FILE, ("user",)))
        maps = schema.ID_MAPS_DIR
        for kind in ("item", "user"):
            self.write(f"SELECT raw, id FROM {kind}_vocab", Output(f"{maps}/{kind}.parquet", ("id",)))
        for spec in self.item_specs + self.user_specs:
            kind = "item" if spec in self.item_specs else "user"
            self.write(f"SELECT value AS raw, vid AS id FROM values_{kind} WHERE feature = '{spec.name}'",
                       Output(f"{maps}/{spec.name}.parquet", ("id",)))
        for name, vocab in CONTEXT_VOCABS.items():
            self.staging.write_parquet(f"{maps}/{name}.parquet", pa.table({
                "raw": pa.array(vocab, pa.string()), "id": pa.array(np.arange(1, len(vocab) + 1), pa.int64())}))
        # What the rest of the plan no longer reads goes, so the engine's memory serves what is left.
        features = [f"{t}_{k}" for k in ("item", "user") for t in ("known", "values", "pairs")]
        features += [f"fv_item_{n}" for n, _ in item_columns] + [f"fv_user_{n}" for n, _ in user_columns]
        e.drop("item_table", "freq", "titles", "item_feature_rows", "user_feature_rows", "item_vocab", "user_vocab",
               *features)

    def encode(self, kind: str) -> tuple[list[schema.FeatureSpec], list[tuple[str, str]]]:
        """Per feature of `kind`: dense value ids (1..m in the order of the values' text, over the entities that
        survived the filters), each entity's value ids (a sorted list for multi-valued features; the smallest
        for a scalar one, 0 when it has none), and the spec (vocabulary size, mean values per entity)."""
        e, d = self.engine, self.d
        e.create(f"known_{kind}", f"SELECT v.id, f.feature, f.value FROM {kind}_feature_rows f JOIN {kind}_vocab v "
                                  f"ON f.key = v.raw")
        e.create(f"values_{kind}", f"SELECT feature, value, CAST(row_number() OVER (PARTITION BY feature ORDER BY "
                                   f"value) AS BIGINT) AS vid FROM (SELECT DISTINCT feature, value "
                                   f"FROM known_{kind}) v")
        e.create(f"pairs_{kind}", f"SELECT DISTINCT k.id, k.feature, x.vid FROM known_{kind} k JOIN values_{kind} x "
                                  f"ON k.feature = x.feature AND k.value = x.value")
        entities = self.counts["items" if kind == "item" else "users"]
        specs, columns = [], []
        stats = e.rows(f"SELECT feature, max(vid) FROM values_{kind} GROUP BY feature ORDER BY feature")
        for name, size in stats:
            multi = name in self.source.multi_valued
            if multi:
                e.create(f"fv_{kind}_{name}", f"SELECT id, {d.ordered_list('vid', 'vid')} AS {name} FROM pairs_{kind} "
                                              f"WHERE feature = '{name}' GROUP BY id")
                column = f"coalesce(fv_{kind}_{name}.{name}, {d.empty_list()}) AS {name}"
                total = self.scalar(f"SELECT count(*) FROM pairs_{kind} WHERE feature = '{name}'")
            else:
                e.create(f"fv_{kind}_{name}", f"SELECT id, min(vid) AS {name} FROM pairs_{kind} "
                                              f"WHERE feature = '{name}' GROUP BY id")
                column = f"coalesce(fv_{kind}_{name}.{name}, 0) AS {name}"
                total = self.scalar(f"SELECT count(*) FROM fv_{kind}_{name}")
            specs.append(schema.FeatureSpec(name, int(size) + 1, multi, float(total / entities) if entities else 0.0))
            columns.append((name, column))
        return specs, columns

    def user_columns(self, alias: str = "u") -> str:
        return "".join(f", {alias}.{spec.name}" for spec in self.user_specs)

    def shape(self, train_files: int = 1) -> Shape:
        return Shape(self.cfg.max_history, self.source.has_time, tuple((s.name, s.multi) for s in self.user_specs),
                     train_files, self.chunks, self.counts["users"], self.seed)

    def events_sql(self) -> str:
        """The events the builders read: each with whether it is a training target."""
        return f"SELECT user, item, ts, pos, {self.train_condition()} AS is_train FROM events"

    def users_sql(self) -> str:
        return f"SELECT user{self.user_columns('user_table')} FROM user_table"

    def step_train(self) -> None:
        """One row per training target (builders.train_rows), shuffled over the parts and within each by a hash
        of (user, position, seed)."""
        values = self.scalar(f"SELECT sum(least(pos, {self.cfg.max_history})) + count(*) FROM train_targets") or 0
        # Long histories: more, smaller parts and groups, so that what is built or written at once stays bounded.
        shape = self.shape(max(parts_needed(self.counts["train_examples"]), math.ceil(values / CHUNK_VALUES)))
        output = Output(schema.TRAIN_DIR, ("_order", "user", "_pos"), shape.train_files, count=schema.HISTORY)
        groups = max(self.chunks, math.ceil(values / CHUNK_VALUES))
        written = self.build("train", shape, self.users_sql(), output, groups)
        self.engine.drop("train_targets")
        self.files[schema.TRAIN_DIR] = written.names
        self.mean_history_length = written.values / written.rows if written.rows else 0.0

    def step_sequences(self) -> None:
        """One row per user with a training target (builders.sequence_rows), the parts in user order."""
        output = Output(schema.SEQUENCES_DIR, ("user",), self.chunks, by_chunk=True, count=schema.SEQUENCE_ITEMS)
        written = self.build("sequences", self.shape(), self.users_sql(), output)
        self.files[schema.SEQUENCES_DIR] = written.names
        self.mean_sequence_length = written.values / written.rows if written.rows else 0.0

    def step_eval(self) -> None:
        """One row per validation or test query (builders.eval_rows), the parts in user order."""
        d = self.d
        for split, directory in (("valid", schema.VALID_DIR), ("test", schema.TEST_DIR)):
            queries = (f"SELECT q.user, q.cutoff, q.context_ts, q.targets{self.user_columns()} FROM (SELECT user, "
                       f"cutoff, context_ts, {d.ordered_list('target', 'target')} AS targets FROM q_{split} "
                       f"GROUP BY user, cutoff, context_ts) q JOIN user_table u ON u.user = q.user")
            output = Output(directory, ("user",), self.chunks, by_chunk=True)
            self.files[directory] = self.build("eval", self.shape(), queries, output).names

    def build(self, kind: str, shape: Shape, side_sql: str, output: Output, groups: int = 0) -> Written:
        """Rows of builders.build(kind) from `groups` groups of users (the chunks by default)."""
        return self.engine.write_built(kind, shape, self.events_sql(), side_sql, output, self.staging,
                                       groups or self.chunks)

    def write(self, sql: str, output: Output) -> Written:
        return self.engine.write(sql, output, self.staging)

    def step_metadata(self) -> None:
        c, cfg = self.counts, self.cfg
        if self.source.events is not None:
            params = json.dumps({self.source.kind: self.source.params}, sort_keys=True)
            checksum, files = hashlib.sha256(params.encode()).hexdigest(), []
        else:
            files = self.engine.checksums(self.source.files)
            combined = hashlib.sha256()
            for entry in files:
                combined.update(bytes.fromhex(entry["sha256"]))
            checksum = combined.hexdigest()
        split = asdict(cfg)
        self.metadata = schema.Metadata(
            schema_version=schema.SCHEMA_VERSION,
            source={**self.info, **self.source.params, "checksum": checksum, "files": files},
            split={"protocol": cfg.protocol, "valid_fraction": cfg.valid_fraction, "test_fraction": cfg.test_fraction,
                   "keep_cold_users": cfg.keep_cold_users, "keep_cold_items": cfg.keep_cold_items, "seed": self.seed},
            filters={k: split[k] for k in ("min_user_events", "min_item_events", "min_positive_rating",
                                           "min_relevant_rating")},
            max_history=cfg.max_history, num_users=c["users"], num_items=c["items"],
            counts={"events": c["events"], "duplicate_rows": c["raw_events"] - c["dedup"],
                    "dropped_events": c["dedup"] - c["events"], "dropped_users": c["users_before"] - c["users"],
                    "dropped_items": c["items_before"] - c["items"], "train_examples": c["train_examples"],
                    "valid_rows": c["valid_rows"], "test_rows": c["test_rows"],
                    "valid_dropped_users": c["valid_dropped_users"], "test_dropped_users": c["test_dropped_users"]},
            repeats=self.repeats, item_features=self.item_specs, user_features=self.user_specs,
            context_features=list(CONTEXT_SPECS) if self.source.has_time else [],
            mean_history_length=self.mean_history_length, mean_sequence_length=self.mean_sequence_length,
            files=self.files, event_times=self.source.has_time)
        self.staging.write_text(schema.METADATA_FILE, self.metadata.to_json())
