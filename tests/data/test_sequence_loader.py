"""Sequence batches for the transformer tower, checked against the bag tower's training examples: every
training target exactly once per epoch across ranks, at the position that sees the true history, with the
user and context features of its example; no validation or test target is ever a training target."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from config import LoaderConfig, NegativesConfig
from data import schema
from data.errors import DataError
from data.keys import ITEM_KEY, SEQUENCE_KEY, history_key
from data.loader import POOLED, SEQUENCE, bucketed, drop_features, open_loader
from data.prepare.cli import main as prepare_main
from data.ragged import list_array
from data.schema import PAD_ID
from data.sequences import chunk_bounds, chunk_counts
from tests.conftest import recommit
from tests.data.test_loader import jagged_rows
from trainer.evaluate import evaluate


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory):
    """9 users with 4 to 17 distinct items each, timestamps hours apart (so context features vary), and one
    user feature."""
    tmp = tmp_path_factory.mktemp("seq")
    rng = np.random.default_rng(0)
    rows = []
    for user in range(9):
        items = rng.choice(40, 4 + 2 * user - (user > 6), replace=False)
        rows += [(f"u{user}", f"i{item}", 1_000_000 + 5_000 * t + 977 * user) for t, item in enumerate(items)]
    pd.DataFrame(rows, columns=["user", "item", "ts"]).to_csv(tmp / "events.csv", index=False)
    pd.DataFrame({"user": [f"u{u}" for u in range(9)], "group": list("xyzxyzxyz")}).to_csv(tmp / "users.csv",
                                                                                         index=False)
    out = tmp / "out"
    assert prepare_main(["interactions", str(tmp / "events.csv"), "--user-col", "user", "--item-col", "item",
                         "--time-col", "ts", "--user-features", str(tmp / "users.csv"), "--min-user-events", "4",
                         "--out", str(out)]) == 0
    return out


def event_times(path) -> dict[tuple[int, int], int]:
    """(dense user, dense item) -> the event's time, from the source file and the prepared id maps."""
    ids = {kind: dict(pd.read_parquet(path / "id_maps" / f"{kind}.parquet").values.tolist())
           for kind in ("user", "item")}
    events = pd.read_csv(path.parent / "events.csv")
    return {(ids["user"][u], ids["item"][i]): t for u, i, t in events.itertuples(index=False)}


def bag_examples(path) -> dict[tuple[int, int], dict]:
    """(user, target) -> the bag tower's training example: whole history and every query feature."""
    cfg = LoaderConfig(batch_size=8, history_bags=[0], use_user_id=True, feature_dropout=0.0)
    loader = open_loader(path, cfg, negatives=NegativesConfig(kind="in_batch"))
    examples = {}
    for batch in loader.epoch(0):
        rows = {key: jagged_rows(batch.sparse, key) for key in loader.query_keys}
        for i in range(batch.batch_size):
            if batch.row_mask[i]:
                key = (rows["user_id"][i][0], int(batch.candidate_ids[i]))
                assert key not in examples, "the synthetic users never repeat an item"
                examples[key] = {k: v[i] for k, v in rows.items()}
    return examples


def sequence_examples(path, max_length: int, world: int = 1, batch_size: int = 3, bucket: bool = False):
    """Every position of one epoch over `world` ranks: (user, target, visible inputs, query features, the times
    of its inputs and of its target)."""
    cfg = LoaderConfig(batch_size=batch_size, max_sequence_length=max_length, use_user_id=True,
                       feature_dropout=0.0, bucket_by_length=bucket)
    out, lengths = [], []
    for rank in range(world):
        loader = open_loader(path, cfg, rank=rank, world_size=world, layout=SEQUENCE,
                             negatives=NegativesConfig(num_sampled=4))
        batches = list(loader.epoch(0))
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        for batch in batches:
            inputs = jagged_rows(batch.sequence, SEQUENCE_KEY)
            b, p = batch.batch_size, len(batch.positions)
            assert batch.sequence.stride() == b + len(batch.candidate_ids) and batch.sparse.stride() == p + len(
                batch.candidate_ids)
            assert jagged_rows(batch.sequence, ITEM_KEY)[b:] == [[c] for c in batch.candidate_ids.tolist()]
            assert all(len(row) <= max_length for row in inputs)
            assert torch.equal(batch.row_mask, torch.tensor([len(row) > 0 for row in inputs[:b]]))
            width = max(len(row) for row in inputs[:b])
            assert batch.times.shape == (b, width + 1)
            features = {key: jagged_rows(batch.sparse, key)[:p] for key in loader.query_keys}
            u = int(batch.num_positives[0])
            assert len(set(batch.candidate_ids[:u].tolist())) == u, "in-batch targets are distinct"
            for j, (position, column) in enumerate(zip(batch.positions.tolist(), batch.own_column.tolist())):
                row, step = divmod(position, width)
                out.append((features["user_id"][j][0], int(batch.candidate_ids[column]), inputs[row][:step + 1],
                            {key: rows[j] for key, rows in features.items()}, batch.times[row, :step + 2].tolist()))
    assert len(set(lengths)) == 1, "every rank runs the same number of steps"
    return out


@pytest.mark.parametrize("max_length,world,bucket", [(3, 1, False), (5, 2, False), (200, 2, False), (3, 1, True),
                                                     (5, 2, True), (200, 2, True)])
def test_every_training_target_once_at_the_position_that_sees_its_history(events_dir, max_length, world, bucket):
    bags = bag_examples(events_dir)
    times = event_times(events_dir)
    positions = sequence_examples(events_dir, max_length, world, bucket=bucket)
    assert Counter((user, target) for user, target, *_ in positions) == Counter(list(bags)), \
        "each training target exactly once per epoch across ranks"
    inputs = Counter()  # per user: inputs of its sequence (every event but the last training target)
    for user, _ in bags:
        inputs[user] += 1
    for user, target, visible, features, row_times in positions:
        assert row_times == [times[(user, item)] for item in visible + [target]], "inputs' times, then the target's"
        example = bags[(user, target)]
        history = example[history_key(0)]
        assert visible == history[len(history) - len(visible):] and 1 <= len(visible) <= max_length
        if len(visible) < len(history):
            assert inputs[user] > max_length, "a position sees less than its whole history only when chunked"
        assert {k: v for k, v in features.items()} == {k: example[k] for k in features}, \
            "user features of the row, context of the target event"
    assert {"c_hour", "c_dow", "u_group"} <= set(positions[0][3])


def test_bucketing_is_a_permutation_cut_into_batches_of_about_one_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 201, 1000)
    order = rng.permutation(1000)
    out = bucketed(order, lengths, 64, np.random.default_rng(1))
    assert sorted(out.tolist()) == list(range(1000)) and out[960:].tolist() == order[960:].tolist(), \
        "every row once; the remainder (carried to the next block) keeps its order"
    assert set(out[:960].tolist()) == set(order[:960].tolist())
    spans = [np.ptp(lengths[batch]) for batch in out[:960].reshape(-1, 64)]
    assert max(spans) <= 20, "a batch's rows have about one length"
    firsts = [lengths[batch].min() for batch in out[:960].reshape(-1, 64)]
    assert firsts != sorted(firsts), "the batches go out in random order, not shortest first"


def padding_share(path, bucket: bool, pack: bool = False, batch_size: int = 2) -> float:
    cfg = LoaderConfig(batch_size=batch_size, max_sequence_length=200, bucket_by_length=bucket, pack_rows=pack)
    loader = open_loader(path, cfg, layout=SEQUENCE, negatives=NegativesConfig(num_sampled=4))
    counts = np.array([batch.stack_positions() for batch in loader.epoch(0)]).sum(0)
    real = sum(len(row) for batch in loader.epoch(0) for row in jagged_rows(batch.sequence, SEQUENCE_KEY))
    assert counts[1] == real, "stack_positions counts the batch's real items"
    return 1 - counts[1] / counts[0]


def test_bucketing_by_length_and_packing_cut_the_padding_the_stack_computes(events_dir):
    assert padding_share(events_dir, True) < 0.5 * padding_share(events_dir, False)
    padded, packed = (padding_share(events_dir, False, pack, batch_size=8) for pack in (False, True))
    assert packed < 0.5 * padded, (packed, padded)


def test_bucketing_is_refused_for_a_tower_without_sequences():
    import towers
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match="loader.bucket_by_length=true batches sequence rows by length; the bags "):
        towers.resolve(load_config(None, ["loader.bucket_by_length=true"]))
    assert towers.resolve(load_config(None, ["loader.bucket_by_length=true", "model.query_tower=hstu"]))


def test_no_validation_or_test_target_is_a_training_target(events_dir):
    trained = {(user, target) for user, target, *_ in sequence_examples(events_dir, 4)}
    for split in ("valid", "test"):
        loader = open_loader(events_dir, LoaderConfig(batch_size=4, use_user_id=True), split,
                             layout=SEQUENCE)
        held_out = set()
        for batch in loader.epoch(0):
            users = jagged_rows(batch.sparse, "user_id")
            for i in range(batch.batch_size):
                if batch.row_mask[i]:
                    start, stop = batch.target_offsets[i], batch.target_offsets[i + 1]
                    held_out |= {(users[i][0], t) for t in batch.target_values[start:stop].tolist()}
        assert len(held_out) == 9 and not trained & held_out, split


def csr_rows(offsets: torch.Tensor, values: torch.Tensor) -> list[list[int]]:
    return [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]


def bag_queries(path, cfg: LoaderConfig) -> dict[int, tuple]:
    """user -> (whole history, targets, seen) of the bag tower's evaluation queries, in file order."""
    out = {}
    for batch in open_loader(path, cfg, "valid").epoch(0):
        histories = jagged_rows(batch.sparse, history_key(0))
        targets = csr_rows(batch.target_offsets, batch.target_values)
        seen = csr_rows(batch.seen_offsets, batch.seen_values)
        for i in range(batch.batch_size):
            if batch.row_mask[i]:
                out[int(batch.users[i])] = (histories[i], targets[i], seen[i])
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_evaluation_queries_read_the_last_items_and_point_at_the_last_position(events_dir, world):
    """Every query once across ranks, ordered by length, with its last items, its position, its times, and the
    targets and seen items of the bag tower's same query."""
    times = event_times(events_dir)
    cfg = LoaderConfig(batch_size=2, max_sequence_length=3, history_bags=[0])
    bags = bag_queries(events_dir, cfg)
    users = []
    for rank in range(world):
        order = []
        for seq in open_loader(events_dir, cfg, "valid", rank=rank, world_size=world, layout=SEQUENCE).epoch(0):
            inputs = jagged_rows(seq.sequence, SEQUENCE_KEY)
            width = max(max(len(row) for row in inputs), 1)  # a batch of padding rows still has one step
            assert seq.times.shape == (seq.batch_size, width + 1)
            targets = csr_rows(seq.target_offsets, seq.target_values)
            seen = csr_rows(seq.seen_offsets, seq.seen_values)
            for i in range(seq.batch_size):
                if seq.row_mask[i]:
                    user = int(seq.users[i])
                    history, want_targets, want_seen = bags[user]
                    assert inputs[i] == history[-3:] and (targets[i], seen[i]) == (want_targets, want_seen)
                    assert seq.positions[i] == i * width + len(inputs[i]) - 1
                    assert seq.times[i, :len(inputs[i]) + 1].tolist() == [times[(user, item)] for item in
                                                                           inputs[i] + [targets[i][0]]], \
                        "history's, then query's"
                    users.append(user)
                    order.append(len(inputs[i]))
        assert order == sorted(order), "a rank's queries come by length (one buffer here)"
    assert sorted(users) == sorted(bags), "every query once across ranks"


def drop_one_time(directory, column: str, row: int = 3) -> tuple:
    """Removes one time of `row` from the first part of `directory`; (part, the row's times now)."""
    part = sorted(directory.glob("*.parquet"))[0]
    table = pq.read_table(part)
    times = table.column(column).combine_chunks()
    lengths, values = np.diff(times.offsets.to_numpy()), times.values.to_numpy()
    lengths[row] -= 1
    short = list_array(lengths, np.delete(values, int(lengths[:row + 1].sum())))
    pq.write_table(table.set_column(table.column_names.index(column), column, pa.chunked_array([short])), part)
    return part, int(lengths[row])


@pytest.mark.parametrize("split", ["valid", "train"])
def test_times_not_aligned_with_the_items_are_named(events_dir, tmp_path, split):
    """A prepared file whose times miss one fails with the file and the column (and the row), before a batch."""
    copy = tmp_path / "copy"
    shutil.copytree(events_dir, copy)
    cfg = LoaderConfig(batch_size=2, max_sequence_length=3)
    if split == "valid":
        part, count = drop_one_time(copy / schema.VALID_DIR, schema.HISTORY_TIMES)
        expected = (rf"{part}: column 'history_ts': expected one time per item of history; found {count} times for "
                    rf"{count + 1} items in row 3")
    else:
        part, _ = drop_one_time(copy / schema.SEQUENCES_DIR, schema.SEQUENCE_TIMES)
        expected = rf"{part}: expected list columns aligned with seq_items .*column seq_ts is not aligned"
    recommit(copy)
    with pytest.raises(DataError, match=expected):
        list(open_loader(copy, cfg, split, layout=SEQUENCE).epoch(0))


def test_the_order_of_evaluation_queries_changes_no_metric(events_dir, monkeypatch):
    """The metrics of queries ordered by length equal those of the same queries in file order."""
    cfg = LoaderConfig(batch_size=2, max_sequence_length=3, history_bags=[0])
    loader = open_loader(events_dir, cfg, "valid", layout=SEQUENCE)
    vocab = loader.meta.item_vocab

    def scorer(batch):  # each query's own scores: a function of its last items
        history = batch.sequence[SEQUENCE_KEY]
        rows = torch.repeat_interleave(torch.arange(batch.batch_size), history.lengths().long())
        scores = torch.zeros(batch.batch_size, vocab, dtype=torch.float64)
        scores.index_put_((rows, (history.values() * 7 + 3) % vocab), torch.ones(len(rows), dtype=torch.float64),
                          accumulate=True)
        return scores + torch.arange(vocab, dtype=torch.float64) * 1e-3

    by_length = evaluate(scorer, loader.epoch(0), [1, 5], loader.meta.num_items, torch.device("cpu"))
    monkeypatch.setattr(type(loader), "row_order", lambda self, block, rng: np.arange(block.n))
    in_file_order = evaluate(scorer, loader.epoch(0), [1, 5], loader.meta.num_items, torch.device("cpu"))
    assert by_length["users"] == 9 and by_length == pytest.approx(in_file_order, rel=1e-12)


def test_chunks_are_newest_first_and_cover_each_input_once():
    offsets = np.array([0, 1, 2, 9, 14])  # rows of 1, 1, 7 and 5 events
    assert chunk_counts(np.diff(offsets), 3).tolist() == [0, 0, 2, 2]
    row, start, length = chunk_bounds(offsets, 3)
    assert row.tolist() == [2, 2, 3, 3]
    # Row 2 has inputs 2..7 (event 8 is only a target): newest chunk 5..7 first, then 2..4; row 3: 10..12, 9.
    assert list(zip(start.tolist(), length.tolist())) == [(5, 3), (2, 3), (10, 3), (9, 1)]


def test_feature_dropout_replaces_features_by_the_padding_id_at_its_rate():
    rng = np.random.default_rng(0)
    n = 20_000
    scalar = (np.ones(n, dtype=np.int64), rng.integers(1, 9, n))
    lists = (np.full(n, 2, dtype=np.int64), rng.integers(1, 9, 2 * n))
    (s_len, s_val), (l_len, l_val) = drop_features([scalar, lists], [False, True], 0.25, rng)
    assert np.all(s_len == 1) and abs(np.mean(s_val == PAD_ID) - 0.25) < 0.01
    assert abs(np.mean(l_len == 0) - 0.25) < 0.01 and len(l_val) == l_len.sum()
    assert np.array_equal(l_val, lists[1].reshape(n, 2)[l_len > 0].reshape(-1)), "kept lists keep their values"
    assert drop_features([scalar], [False], 0.0, rng)[0] is scalar


def test_training_batches_drop_query_features_but_never_history_or_candidates(events_dir):
    cfg = LoaderConfig(batch_size=64, history_bags=[0], use_user_id=True, feature_dropout=0.5)
    for layout in (POOLED, SEQUENCE):
        loader = open_loader(events_dir, cfg, layout=layout, negatives=NegativesConfig(num_sampled=4))
        batch = next(iter(loader.epoch(0)))
        rows = batch.positions.numel() if layout.sequence else int(batch.row_mask.sum())
        dropped = np.mean([row in ([], [PAD_ID]) for row in jagged_rows(batch.sparse, "user_id")[:rows]])
        assert 0.2 < dropped < 0.8, (layout, dropped)
        history = batch.sequence if layout.sequence else batch.sparse
        key = SEQUENCE_KEY if layout.sequence else history_key(0)
        assert all(jagged_rows(history, key)[i] for i in range(int(batch.row_mask.sum())) if batch.row_mask[i])


def stack_lanes(batch, pack: bool) -> int:
    """The lanes the stack runs on: one a row when padded, the lanes its non-empty rows use when packed."""
    if not pack:
        return batch.batch_size
    rows = jagged_rows(batch.sequence, SEQUENCE_KEY)[:batch.batch_size]
    return len({lane for (lane, _), row in zip(batch.lanes.tolist(), rows) if len(row)})


@pytest.mark.parametrize("pack", [True, False])
def test_the_training_window_reports_the_padding_share_of_sequence_batches(events_dir, pack):
    from trainer.loop import TimedIterator, Window

    cfg = LoaderConfig(batch_size=8, max_sequence_length=200, pack_rows=pack)
    loader = open_loader(events_dir, cfg, layout=SEQUENCE, negatives=NegativesConfig(num_sampled=4))
    data = TimedIterator(iter(loader.epoch(0)))
    window = Window(data)
    batches = list(data)
    for _ in batches:
        window.add({"loss": torch.tensor(1.0), "examples": torch.tensor(1)}, 0, 0, 0)
    computed = sum(stack_lanes(b, pack) * max(len(r) for r in jagged_rows(b.sequence, SEQUENCE_KEY)) for b in batches)
    real = sum(len(r) for b in batches for r in jagged_rows(b.sequence, SEQUENCE_KEY))
    assert window.metrics(1, 0)["train/padding_share"] == pytest.approx(1 - real / computed)
    bags = TimedIterator(iter(open_loader(events_dir, cfg, negatives=NegativesConfig()).epoch(0)))
    window = Window(bags)
    for _ in bags:
        window.add({"loss": torch.tensor(1.0), "examples": torch.tensor(1)}, 0, 0, 0)
    assert "train/padding_share" not in window.metrics(1, 0), "bag batches have no padded stack"
