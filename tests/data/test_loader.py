"""The loader's guarantees: exactly-once sharding, equal batch counts, KJT == per-row reference."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from config import LoaderConfig, NegativesConfig
from data.errors import DataError
from data.keys import history_key
from data.loader import open_loader
from tests.conftest import recommit


def jagged_rows(kjt, key):
    """Per-row lists of one KJT key: the slow, obviously-correct view."""
    jt = kjt[key]
    return [jt.values()[a:b].tolist() for a, b in zip(jt.offsets()[:-1].tolist(), jt.offsets()[1:].tolist())]


def reference_query(row: dict, bags: list[int], key: str):
    history = row["history"]
    for k in bags:
        if key == history_key(k):
            return history if k == 0 else history[max(0, len(history) - k):]
    value = row[key]
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("batch_size,buffer", [(16, 40), (7, 1000), (64, 64)])
def test_two_ranks_yield_every_example_exactly_once_with_equal_batch_counts(fake_prepared, batch_size, buffer):
    path, info = fake_prepared()
    cfg = LoaderConfig(batch_size=batch_size, shuffle_buffer=buffer, seed=3)
    seen, counts = Counter(), []
    for rank in range(2):
        loader = open_loader(path, cfg, rank=rank, world_size=2, negatives=NegativesConfig(num_sampled=5))
        batches = list(loader.epoch(0))
        counts.append(len(batches))
        assert len(batches) == len(loader)
        for batch in batches:
            assert batch.sparse.stride() == batch_size + 5
            assert batch.row_mask.numel() == batch_size
            positives = batch.candidate_ids[:batch_size]
            assert torch.all((positives > 0) == batch.row_mask)
            seen.update(positives[batch.row_mask].tolist())
    assert counts[0] == counts[1]
    expected = Counter(row["target"] for row in info["rows"])
    assert seen == expected, "every example exactly once across ranks"


def test_kjt_equals_per_row_reference_including_empty_histories(fake_prepared):
    path, info = fake_prepared(seed=1)
    by_target = {row["target"]: row for row in info["rows"]}
    items = {row["item"]: row for row in info["items"]}
    assert any(len(row["history"]) == 0 for row in info["rows"])
    cfg = LoaderConfig(batch_size=13, history_bags=[1, 3, 0], use_user_id=True, shuffle_buffer=50,
                       feature_dropout=0.0)
    loader = open_loader(path, cfg, negatives=NegativesConfig(num_sampled=4))
    assert loader.query_keys == ["hist_last1", "hist_last3", "hist_all", "user_id", "u_age", "u_tags"]
    checked_empty = False
    for batch in loader.epoch(0):
        b = batch.batch_size
        candidates = batch.candidate_ids.tolist()
        for key in loader.query_keys:
            rows = jagged_rows(batch.sparse, key)
            for i in range(b):
                if not batch.row_mask[i]:
                    assert rows[i] == [] or key in ("user_id", "u_age")
                    continue
                row = by_target[candidates[i]]
                want = [row["user"]] if key == "user_id" else reference_query(row, cfg.history_bags, key)
                assert rows[i] == want, (key, row)
                checked_empty |= key == "hist_all" and row["history"] == []
            assert all(r == [] for r in rows[b:]), "query keys are empty bags on negative rows"
        for key, feature in (("cand_item", None), ("cand_i_genre", "i_genre"), ("cand_i_decade", "i_decade")):
            rows = jagged_rows(batch.sparse, key)
            for i, item in enumerate(candidates):
                if item == 0:
                    assert rows[i] in ([], [0])
                    continue
                want = [item] if feature is None else items[item][feature]
                assert rows[i] == (want if isinstance(want, list) else [want])
    assert checked_empty


def test_shuffling_is_seeded_and_changes_between_epochs(fake_prepared):
    path, _ = fake_prepared()
    def order(seed, epoch):
        loader = open_loader(path, LoaderConfig(batch_size=16, seed=seed, shuffle_buffer=64),
                             negatives=NegativesConfig(num_sampled=3))
        return [b.candidate_ids.tolist() for b in loader.epoch(epoch)]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


def test_resume_from_a_batch_gives_the_remaining_batches_unchanged(fake_prepared):
    path, _ = fake_prepared()
    loader = open_loader(path, LoaderConfig(batch_size=16, shuffle_buffer=64), negatives=NegativesConfig(num_sampled=3))
    full = [(b.candidate_ids.tolist(), b.sparse.values().tolist()) for b in loader.epoch(2)]
    tail = [(b.candidate_ids.tolist(), b.sparse.values().tolist()) for b in loader.epoch(2, start_batch=5)]
    assert tail == full[5:]


@pytest.mark.parametrize("kind,alpha", [("uniform", 1.0), ("frequency", 1.0), ("frequency", 0.5), ("mixed", 0.75),
                                        ("mixed", 0.0)])
def test_negatives_follow_the_proposal(fake_prepared, kind, alpha):
    path, info = fake_prepared(file_sizes=(400,), row_group=100)
    loader = open_loader(path, LoaderConfig(batch_size=50), negatives=NegativesConfig(kind, 2000, alpha))
    freq = np.array([0] + [row["freq"] for row in info["items"]], dtype=np.float64)
    alike = kind == "uniform" or alpha == 0
    weights = np.ones_like(freq) if alike else np.where(freq > 0, freq ** alpha, 0.0)
    weights[0] = 0
    probs = weights / weights.sum()
    np.testing.assert_allclose(loader.negatives.probs, probs, rtol=1e-9, err_msg="the q the loss uses for logQ")
    assert loader.negatives.in_batch == (kind == "mixed")
    counts = np.zeros(len(freq))
    for batch in loader.epoch(0):
        np.add.at(counts, batch.candidate_ids[50:].numpy(), 1)
    assert counts[0] == 0 and np.all(counts[probs == 0] == 0)
    expected = probs * counts.sum()
    support = expected > 0
    chi2 = (((counts - expected) ** 2)[support] / expected[support]).sum()
    dof = support.sum() - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), "sampled counts fit the proposal (chi-square, 5 sigma)"
    other = np.ones_like(probs) if not alike else np.where(freq > 0, freq, 0.0)
    other = other[1:] / other[1:].sum() * counts.sum()
    assert ((counts[1:] - other) ** 2 / np.maximum(other, 1e-9)).sum() > dof + 5 * np.sqrt(2 * dof), \
        "the same test rejects the other proposal, so it has power"


def test_eval_split_yields_each_user_once_with_targets_and_seen(tmp_path):
    from data.prepare import prepare
    from data.splits import SplitConfig
    from data.synthetic import SyntheticConfig, generate

    prepare(generate(SyntheticConfig(num_users=300, num_items=120, mean_events=12)), SplitConfig(max_history=5),
            tmp_path / "syn")
    valid = pq.read_table(tmp_path / "syn" / "valid").to_pylist()
    by_user = {row["user"]: row for row in valid}
    for rank in range(2):
        loader = open_loader(tmp_path / "syn", LoaderConfig(batch_size=64), split="valid", rank=rank, world_size=2)
        for batch in loader.epoch(0):
            t_off, s_off = batch.target_offsets.tolist(), batch.seen_offsets.tolist()
            for i, user in enumerate(batch.users.tolist()):
                if user == 0:
                    continue
                row = by_user.pop(user)
                assert batch.target_values[t_off[i]:t_off[i + 1]].tolist() == row["targets"]
                assert batch.seen_values[s_off[i]:s_off[i + 1]].tolist() == row["seen"]
    assert not by_user, "every validation user was yielded once"


def test_loader_errors_surface_from_the_background_thread(fake_prepared):
    path, info = fake_prepared()
    part = path / info["meta"].files["train"][1]
    table = pq.read_table(part)
    history = table.column("history").combine_chunks()
    import pyarrow as pa
    bad = pa.ListArray.from_arrays(history.offsets, pa.array(np.full(len(history.values), 10_000)))
    pq.write_table(table.set_column(1, "history", bad), part, row_group_size=16)
    recommit(path)
    loader = open_loader(path, LoaderConfig(batch_size=8), negatives=NegativesConfig(num_sampled=2))
    with pytest.raises(DataError) as err:
        for _ in loader.epoch(0):
            pass
    assert str(part) in str(err.value) and "'history'" in str(err.value)


def test_train_batch_moves_as_one_pipelineable(fake_prepared):
    path, _ = fake_prepared()
    batch = next(iter(open_loader(path, LoaderConfig(batch_size=8), negatives=NegativesConfig(num_sampled=2)).epoch(0)))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert type(moved) is type(batch)
    assert torch.equal(moved.sparse.values(), batch.sparse.values())
    assert torch.equal(moved.candidate_ids, batch.candidate_ids)
