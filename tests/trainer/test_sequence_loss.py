"""The transformer's loss over every position: brute-force float64 references for the value, the gradients
and the sign of logQ, the distinct-candidate logQ, chunking, and mutants that the references must catch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trainer.loss.kernel as loss_module
import trainer.loss.modules as loss_modules
from data.batch import make_kjt
from data.keys import SEQUENCE_KEY
from data.negatives import Negatives
from tests.trainer.test_loss import brute_force, per_item
from trainer.loss.kernel import accidental_hits, seen_hits, softmax_cross_entropy
from trainer.loss.logq import CandidateLogQ
from trainer.loss.modules import SequenceRetrievalLoss

TEMPERATURE = 0.3


def sequence_case(seed=0, p=7, d=3):
    """7 positions over 4 distinct targets (ids 5, 8, 2, 9), then 5 negatives: one equal to target 8, one
    equal to target 2, two copies of item 4 and a fresh item."""
    gen = torch.Generator().manual_seed(seed)
    targets = torch.tensor([5, 8, 2, 9])
    negatives = torch.tensor([8, 4, 2, 4, 11])
    own = torch.tensor([0, 1, 1, 2, 3, 0, 2])[:p]
    query = torch.nn.functional.normalize(torch.randn(p, d, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.cat([targets, negatives])
    # Copies of an item are one embedding, as the candidate tower makes them.
    candidates = torch.nn.functional.normalize(torch.randn(12, d, generator=gen, dtype=torch.float64), dim=1)[ids]
    batch = SimpleNamespace(num_positives=torch.tensor([4]), candidate_ids=ids, own_column=own)
    freq = torch.tensor([0.0, 3, 9, 1, 4, 12, 2, 2, 6, 5, 1, 1])
    proposal = torch.tensor([0.0, 0.05, 0.1, 0.05, 0.2, 0.1, 0.05, 0.05, 0.1, 0.1, 0.1, 0.1])
    return query.requires_grad_(), candidates.detach().requires_grad_(), batch, freq, proposal


def log_q_of(freq, proposal, in_batch=True, negatives=5):
    return CandidateLogQ(freq, Negatives("mixed" if in_batch else "uniform", in_batch, negatives, proposal.numpy()),
                         "exact", 16, 0.1)


# The 7 positions read two history rows: row 0 (items 3, 4, 11, 5) at its steps 0-3, row 1 (8, 2, 4) at its
# steps 0-2. What they have read covers a target column (5, 8), both copies of negative 4, negative 11, and, at
# the last position, its own target 2 (a repeat: its own column stays, the other copy of 2 is masked).
HISTORY = [[3, 4, 11, 5], [8, 2, 4]]
POSITIONS = [0, 1, 2, 3, 4, 5, 6]  # row * 4 + step: the batch's longest row has 4 items


def with_history(batch):
    lengths = np.array([len(r) for r in HISTORY])
    batch.sequence = make_kjt([SEQUENCE_KEY], [(lengths, np.concatenate(HISTORY))])
    batch.positions, batch.row_mask = torch.tensor(POSITIONS), torch.ones(len(HISTORY), dtype=torch.bool)
    return batch


def read_items():
    """Per position, the items it has read: its row up to and including its step."""
    return [set(HISTORY[p // 4][:p % 4 + 1]) for p in POSITIONS]


def reference(query, candidates, batch, log_q, in_batch, on_positive, seen=None):
    """The definition (tests/trainer/test_loss.py:brute_force), position by position: the own column is the target's,
    every other column holding that item (or, with `seen`, an item the position has read) is skipped, and
    the loss is the mean over positions."""
    ids = batch.candidate_ids.tolist()
    return brute_force(query, candidates, ids, batch.own_column.tolist(), [True] * query.shape[0], log_q,
                       int(batch.num_positives[0]), TEMPERATURE, in_batch, on_positive, seen)


def assert_matches(ours, ref, inputs, ids, merge):
    """Value and gradients equal the reference's; merged (one column per item), the gradient reaching each
    item is compared."""
    grads, ref_grads = torch.autograd.grad(ours, inputs), torch.autograd.grad(ref, inputs)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-9, atol=1e-12)
    got, want = grads[1], ref_grads[1]
    if merge:
        got, want = per_item(got, ids), per_item(want, ids)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def expected_log_q(freq, proposal, ids, targets, negatives, in_batch):
    """log(P(item in the distinct targets of P draws) + S q): 1 - (1 - p)^P, by the complement rule."""
    p = freq.double() / freq.sum()
    inclusion = 1 - (1 - p[ids]) ** len(targets)
    return torch.log((inclusion if in_batch else 0) + negatives * proposal.double()[ids])


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("in_batch,use_logq,on_positive", [(True, True, True), (True, True, False),
                                                           (True, False, True), (False, True, True)])
def test_value_and_gradients_match_brute_force(in_batch, use_logq, on_positive, merge):
    """Merged (one column per item), the gradient reaching each item is the reference's."""
    query, candidates, batch, freq, proposal = sequence_case()
    log_q = log_q_of(freq, proposal, in_batch) if use_logq else None
    ours = SequenceRetrievalLoss(TEMPERATURE, in_batch, on_positive, log_q, max_logits=1 << 20, merge=merge)(
        query, candidates, batch)
    column_log_q = None
    if use_logq:
        column_log_q = log_q.distinct(batch.candidate_ids, batch.candidate_ids[:4][batch.own_column],
                                      torch.tensor([7]))
        torch.testing.assert_close(column_log_q.double(), expected_log_q(
            freq, proposal, batch.candidate_ids, batch.own_column, 5, in_batch), rtol=1e-6, atol=1e-6)
    ref = reference(query, candidates, batch, column_log_q, in_batch, on_positive)
    assert_matches(ours, ref, (query, candidates), batch.candidate_ids, merge)


@pytest.mark.parametrize("mutant,merge", [("flipped_logq_sign", True), ("flipped_logq_sign", False),
                                          ("no_accidental_hit_mask", False), ("merged_without_copies", True)])
def test_the_reference_catches_a_flipped_sign_and_a_missing_mask(monkeypatch, mutant, merge):
    """The comparison above is sharp: a loss with logQ added instead of subtracted, without the mask of
    accidental hits (the negatives 8 and 2 equal targets), or merging copies (item 4 twice) without raising
    the merged column by log(copies), differs from the reference."""
    query, candidates, batch, freq, proposal = sequence_case()
    log_q = log_q_of(freq, proposal)
    column_log_q = log_q.distinct(batch.candidate_ids, batch.candidate_ids[:4][batch.own_column], torch.tensor([7]))
    ref = reference(query, candidates, batch, column_log_q, True, True)
    if mutant == "flipped_logq_sign":
        monkeypatch.setattr(CandidateLogQ, "distinct", lambda self, *args: -column_log_q)
    elif mutant == "no_accidental_hit_mask":
        monkeypatch.setattr(loss_modules, "accidental_hits", lambda rows, ids, own: (own[:0], own[:0]))
    else:
        monkeypatch.setattr(loss_module, "log_copies", torch.zeros_like)
    broken = SequenceRetrievalLoss(TEMPERATURE, True, True, log_q, max_logits=1 << 20, merge=merge)(
        query, candidates, batch)
    assert abs(broken.item() - ref.item()) > 1e-3, (mutant, broken.item(), ref.item())


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("in_batch,use_logq", [(True, True), (True, False), (False, True)])
def test_masking_what_each_position_has_read_matches_brute_force(in_batch, use_logq, merge):
    """loss.mask_seen: value and gradients equal the reference that skips, per position, every column holding
    an item of its row up to and including it (its own target column excepted)."""
    query, candidates, batch, freq, proposal = sequence_case()
    batch = with_history(batch)
    log_q = log_q_of(freq, proposal, in_batch) if use_logq else None
    ours = SequenceRetrievalLoss(TEMPERATURE, in_batch, True, log_q, max_logits=1 << 20, merge=merge,
                                 mask_seen=True)(query, candidates, batch)
    column_log_q = None if log_q is None else log_q.distinct(
        batch.candidate_ids, batch.candidate_ids[:4][batch.own_column], torch.tensor([7]))
    ref = reference(query, candidates, batch, column_log_q, in_batch, True, read_items())
    assert_matches(ours, ref, (query, candidates), batch.candidate_ids, merge)


@pytest.mark.parametrize("mutant", ["no_seen_mask", "whole_row_masked", "mask_seen_ignored"])
def test_the_seen_reference_catches_a_missing_or_a_too_wide_mask(monkeypatch, mutant):
    """Without the mask, with the row's later items masked too (the future it has not read), or with the
    flag not reaching the loss, the value differs from the reference."""
    query, candidates, batch, freq, proposal = sequence_case()
    batch = with_history(batch)
    log_q = log_q_of(freq, proposal)
    column_log_q = log_q.distinct(batch.candidate_ids, batch.candidate_ids[:4][batch.own_column], torch.tensor([7]))
    ref = reference(query, candidates, batch, column_log_q, True, True, read_items())
    real = loss_module.seen_hits
    if mutant == "no_seen_mask":
        monkeypatch.setattr(loss_modules, "seen_hits", lambda *args: (torch.zeros(0, dtype=torch.long),) * 2)
    elif mutant == "whole_row_masked":
        last = torch.tensor([(p // 4) * 4 + len(HISTORY[p // 4]) - 1 for p in POSITIONS])
        monkeypatch.setattr(loss_modules, "seen_hits", lambda h, lengths, p, c, o: real(h, lengths, last, c, o))
    broken = SequenceRetrievalLoss(TEMPERATURE, True, True, log_q, max_logits=1 << 20,
                                   mask_seen=mutant != "mask_seen_ignored")(query, candidates, batch)
    assert abs(broken.item() - ref.item()) > 1e-3, (mutant, broken.item(), ref.item())


def test_seen_hits_equal_the_brute_force_comparison():
    """Random rows with repeated items, columns with copies and padding: every (position, column) whose item
    the position has read, except its own column, once per read, sorted by position."""
    rng = np.random.default_rng(3)
    lengths = torch.tensor([5, 0, 9, 3])
    history = torch.from_numpy(rng.integers(1, 8, int(lengths.sum())))
    rows = torch.repeat_interleave(torch.arange(4), lengths)
    steps = torch.cat([torch.arange(n) for n in lengths.tolist()])
    positions = rows * 9 + steps
    ids = torch.from_numpy(np.r_[rng.integers(0, 10, 14)])
    own = torch.from_numpy(rng.integers(0, 14, len(positions)))
    got_rows, got_columns = seen_hits(history, lengths, positions, ids, own)
    starts = torch.cumsum(lengths, 0) - lengths
    want = []
    for i, (r, t) in enumerate(zip(rows.tolist(), steps.tolist())):
        for item in history[starts[r]:starts[r] + t + 1].tolist():
            want += [(i, j) for j in range(len(ids)) if ids[j] == item and j != own[i]]
    assert sorted(zip(got_rows.tolist(), got_columns.tolist())) == sorted(want) and len(want) > 20
    assert torch.equal(got_rows, torch.sort(got_rows, stable=True).values), "hits come sorted by position"


def test_accidental_hits_equal_the_brute_force_comparison():
    rng = np.random.default_rng(0)
    row_items = torch.from_numpy(rng.integers(1, 6, 40))
    ids = torch.from_numpy(np.r_[np.arange(1, 6), rng.integers(0, 8, 30)])
    own = row_items - 1  # each row's item sits in column item - 1 of the distinct block
    rows, columns = accidental_hits(row_items, ids, own)
    got = sorted(zip(rows.tolist(), columns.tolist()))
    want = sorted((i, j) for i in range(40) for j in range(len(ids))
                  if ids[j] == row_items[i] and j != own[i] and ids[j] > 0)
    assert got == want and len(want) > 10
    assert torch.equal(rows, torch.sort(rows, stable=True).values), "hits come sorted by row"


@pytest.mark.parametrize("max_logits", [1, 9, 20, 1 << 20])
def test_chunked_logits_equal_one_computation_and_respect_the_budget(monkeypatch, max_logits):
    gen = torch.Generator().manual_seed(1)
    p, c, d = 23, 9, 4
    query = torch.randn(p, d, generator=gen, dtype=torch.float64, requires_grad=True)
    candidates = torch.randn(c, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([1, 2, 3, 4, 0, 2, 5, 6, 3])
    own = torch.from_numpy(np.random.default_rng(0).integers(0, 4, p))
    bias = -torch.rand(c, generator=gen, dtype=torch.float64)
    args = (bias, own, -bias[own], accidental_hits(ids[own], ids, own), torch.ones(p, dtype=torch.float64), 0.5)
    whole = softmax_cross_entropy(query, candidates, *args, max_logits=1 << 30)
    whole_grads = torch.autograd.grad(whole, (query, candidates))
    shapes = []
    real_addmm = torch.addmm

    def recording_addmm(*a, **k):
        out = real_addmm(*a, **k)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(loss_module.torch, "addmm", recording_addmm)
    chunked = softmax_cross_entropy(query, candidates, *args, max_logits=max_logits)
    chunked_grads = torch.autograd.grad(chunked, (query, candidates))
    assert sum(rows for rows, _ in shapes) == p
    assert max(rows for rows, _ in shapes) * c <= max(max_logits, c), shapes
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
    for got, want in zip(chunked_grads, whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_without_gradients_no_gradient_work_is_done():
    query, candidates, batch, freq, proposal = sequence_case()
    loss = SequenceRetrievalLoss(TEMPERATURE, True, True, log_q_of(freq, proposal), 1 << 20)
    with torch.no_grad():
        value = loss(query, candidates, batch)
    assert not value.requires_grad and value.item() == pytest.approx(loss(query, candidates, batch).item())


def train_free_sequence_embeddings(logq_sign: float, seed: int = 0) -> float:
    """Free context/item embeddings trained with SequenceRetrievalLoss (distinct in-batch targets plus
    uniform negatives) on a Zipf-skewed p(y|x); returns the expected recall@10 on the true distribution."""
    rng = np.random.default_rng(seed)
    n_items, n_ctx, d, positions, negatives, steps = 300, 40, 16, 96, 32, 500
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    p_y_given_x = popularity[None, :] * np.exp(rng.normal(size=(n_ctx, n_items)))
    p_y_given_x /= p_y_given_x.sum(1, keepdims=True)
    freq = torch.from_numpy(np.r_[0.0, p_y_given_x.mean(0)])
    proposal = torch.from_numpy(np.r_[0.0, np.full(n_items, 1.0 / n_items)])
    log_q = CandidateLogQ(freq, Negatives("mixed", True, negatives, proposal.numpy()), "exact", 16, 0.1)
    gen = torch.Generator().manual_seed(seed)
    qe = torch.nn.Parameter(torch.randn(n_ctx, d, generator=gen, dtype=torch.float64) * 0.1)
    ie = torch.nn.Parameter(torch.randn(n_items + 1, d, generator=gen, dtype=torch.float64) * 0.1)
    opt = torch.optim.Adam([qe, ie], lr=0.05)
    cdf = p_y_given_x.cumsum(1)
    signed = CandidateLogQ.distinct
    loss = SequenceRetrievalLoss(1.0, True, True, log_q, 1 << 20)
    log_q.distinct = lambda *args: logq_sign * signed(log_q, *args)
    for _ in range(steps):
        x = rng.integers(0, n_ctx, positions)
        y = np.minimum((cdf[x] < rng.random(positions)[:, None]).sum(1), n_items - 1) + 1
        distinct, own = np.unique(y, return_inverse=True)
        ids = torch.from_numpy(np.r_[distinct, rng.integers(1, n_items + 1, negatives)])
        batch = SimpleNamespace(num_positives=torch.tensor([len(distinct)]), candidate_ids=ids,
                                own_column=torch.from_numpy(own.reshape(-1)))
        value = loss(qe[x], ie[ids], batch)
        opt.zero_grad()
        value.backward()
        opt.step()
    scores = (qe @ ie[1:].T).detach().numpy()
    top = np.argsort(-scores, axis=1)[:, :10]
    return float(np.mean([p_y_given_x[x, top[x]].sum() for x in range(n_ctx)]))


def test_logq_sign_over_distinct_targets_on_a_skewed_distribution():
    """Subtracting log Q gives the best true recall@10; no correction is worse, the flipped sign worst."""
    right, none, flipped = (train_free_sequence_embeddings(sign) for sign in (1.0, 0.0, -1.0))
    assert right > none > flipped, (right, none, flipped)


def dense_reference(query, candidates, bias, own, own_bias, hits, weights, temperature):
    """The kernel's contract with torch's own log-sum-exp over a dense masked matrix, in float64."""
    logits = query @ candidates.T / temperature + bias
    logits[hits[0], hits[1]] = float("-inf")
    rows = torch.arange(len(own))
    own_logit = (query * candidates[own]).sum(1) / temperature + own_bias
    logits[rows, own] = own_logit
    return ((torch.logsumexp(logits, dim=1) - own_logit) * weights).sum()


@pytest.mark.parametrize("norm", [1.0, 40.0])
def test_far_from_unit_vectors_the_kernel_falls_back_to_row_maxima(norm):
    """With unit vectors the per-row bound keeps every exponential in range; with long vectors the bound is
    far above the row's logits, the sums underflow, and the chunk is recomputed against the row maxima."""
    gen = torch.Generator().manual_seed(2)
    query = torch.nn.functional.normalize(torch.randn(30, 5, generator=gen, dtype=torch.float64), dim=1) * norm
    candidates = torch.randn(12, 5, generator=gen, dtype=torch.float64) * norm / 3
    query.requires_grad_(), candidates.requires_grad_()
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 2, 7, 3, 8, 0, 9])
    own = torch.from_numpy(np.random.default_rng(1).integers(0, 6, 30))
    bias = torch.where(ids == 0, -1e9, -torch.rand(12, generator=gen, dtype=torch.float64)).double()
    hits = accidental_hits(ids[own], ids, own)
    args = (bias, own, -bias[own], hits, torch.rand(30, generator=gen, dtype=torch.float64), 0.1)
    ours = softmax_cross_entropy(query, candidates, *args, max_logits=60)
    want = dense_reference(query, candidates, *args)
    assert torch.isfinite(ours) and ours.item() == pytest.approx(want.item(), rel=1e-10)
    for got, ref in zip(torch.autograd.grad(ours, (query, candidates)), torch.autograd.grad(want, (query, candidates))):
        torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("merge", [False, True])
def test_catalogue_negatives_make_the_sequence_loss_the_exact_full_softmax(merge):
    """negatives.kind=catalogue for the transformer: every position against every item once, in float64."""
    from config import load_config
    from trainer.loss.modules import build_loss

    gen = torch.Generator().manual_seed(5)
    items, d, temperature = 10, 4, 0.3
    table = torch.randn(items + 1, d, generator=gen, dtype=torch.float64)
    query = torch.randn(7, d, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([4, 2, 4, 9, 1, 2, 10])
    distinct, own = torch.unique(targets, return_inverse=True)
    cfg = load_config(None, ["negatives.kind=catalogue", f"loss.temperature={temperature}",
                             f"loss.merge_duplicates={str(merge).lower()}"])
    freq = np.r_[0, np.full(items, 5)]
    negatives = Negatives.of(cfg.negatives, freq)
    ids = torch.cat([distinct, torch.from_numpy(negatives.sample(np.random.default_rng(0)))])
    batch = SimpleNamespace(num_positives=torch.tensor([len(distinct)]), candidate_ids=ids, own_column=own)
    embeddings = table.clone().requires_grad_()
    loss = build_loss(cfg, negatives, freq, sequence=True)(query, embeddings[ids], batch)
    grads = torch.autograd.grad(loss, [query, embeddings])
    reference = table.clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(query @ reference[1:].T / temperature, targets - 1)
    expected_grads = torch.autograd.grad(expected, [query, reference])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("top", [40, 10**6], ids=["id_table", "binary_search"])
def test_seen_hits_over_distinct_columns_equal_the_brute_force_comparison(top):
    """The merged loss's columns (distinct ids, ascending) take the one-lookup path: an id -> column table where
    the ids are small against the reads, a binary search where they are not. Both give every (position,
    column) the position has read, except its own column, sorted by position."""
    rng = np.random.default_rng(5)
    lengths = torch.tensor([6, 0, 8, 3])
    vocabulary = np.sort(rng.choice(np.arange(1, top + 1), 30, replace=False))
    history = torch.from_numpy(rng.choice(vocabulary, int(lengths.sum())))
    rows = torch.repeat_interleave(torch.arange(4), lengths)
    steps = torch.cat([torch.arange(n) for n in lengths.tolist()])
    positions = rows * 8 + steps
    ids = torch.from_numpy(np.sort(rng.choice(vocabulary, 12, replace=False)))
    own = torch.from_numpy(rng.integers(0, 12, len(positions)))
    got_rows, got_columns = seen_hits(history, lengths, positions, ids, own)
    starts = torch.cumsum(lengths, 0) - lengths
    want = [(i, j) for i, (r, t) in enumerate(zip(rows.tolist(), steps.tolist()))
            for item in history[starts[r]:starts[r] + t + 1].tolist()
            for j in range(len(ids)) if ids[j] == item and j != own[i]]
    assert list(zip(got_rows.tolist(), got_columns.tolist())) == want and len(want) > 10
