"""The loss against a brute-force float64 reference, the sign of logQ, masking, and the estimator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainer.loss.kernel as loss_module
from data.negatives import Negatives
from trainer.loss.kernel import sampled_softmax_loss
from trainer.loss.logq import CandidateLogQ, StreamingFrequency


def brute_force(q, c, ids, pos, row_mask, log_q, g, temperature, in_batch, logq_on_positive, seen=None):
    """Row by row, column by column, in float64 Python: the definition, written independently. `seen`: per
    row, the items it has already read, left out of its negatives (`loss.mask_seen`)."""
    total, rows = 0.0, 0
    for i in range(q.shape[0]):
        if not row_mask[i]:
            continue
        terms, positive = [], None
        for j in range(c.shape[0]):
            if j != pos[i]:
                if ids[j] == ids[pos[i]] or ids[j] == 0:
                    continue  # accidental hit or padding
                if seen is not None and int(ids[j]) in seen[i]:
                    continue  # already read by this row
                if not in_batch and j < g:
                    continue
            logit = sum(q[i, k] * c[j, k] for k in range(q.shape[1])) / temperature
            if log_q is not None and (logq_on_positive or j != pos[i]):
                logit = logit - log_q[j]  # logQ is subtracted: frequent items are corrected downwards
            terms.append(logit)
            if j == pos[i]:
                positive = logit
        m = max(terms)
        total = total + (m + torch.log(sum(torch.exp(t - m) for t in terms)) - positive)
        rows += 1
    return total / max(rows, 1)


def case(seed=0, b=5, s=4, d=3):
    """A batch with a duplicated positive, a negative equal to a positive, and a padding row."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    ids = torch.tensor([7, 3, 7, 9, 0, 3, 11, 7, 12])[: b + s]
    # Copies of an item are one embedding, as the candidate tower makes them.
    c = torch.nn.functional.normalize(torch.randn(13, d, generator=gen, dtype=torch.float64), dim=1)[ids]
    row_mask = ids[:b] > 0
    log_q = torch.log(torch.rand(13, generator=gen, dtype=torch.float64) * 3 + 0.1)[ids]  # log Q is per item
    return q.requires_grad_(), c.detach().requires_grad_(), ids, row_mask, log_q


def per_item(grad: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The gradient reaching each item: the sum over the columns holding it (what its parameters receive)."""
    return torch.zeros(int(ids.max()) + 1, grad.shape[1], dtype=grad.dtype).index_add_(0, ids, grad)


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("in_batch,use_logq,on_positive", [(True, True, True), (True, True, False),
                                                           (True, False, True), (False, True, True)])
def test_value_and_gradient_match_brute_force(in_batch, use_logq, on_positive, merge):
    """Merged (one column per item) the gradient of each column is not the reference's, but the gradient
    reaching each item is."""
    q, c, ids, row_mask, log_q = case()
    log_q = log_q if use_logq else None
    b = q.shape[0]
    pos = torch.arange(b)
    args = dict(num_in_batch=b, temperature=0.3, in_batch=in_batch, logq_on_positive=on_positive, merge=merge)
    ours = sampled_softmax_loss(q, c, ids, pos, row_mask, log_q, **args)
    grad_q, grad_c = torch.autograd.grad(ours, (q, c))
    ref = brute_force(q, c, ids.tolist(), pos.tolist(), row_mask.tolist(), log_q, b, 0.3, in_batch, on_positive)
    ref_q, ref_c = torch.autograd.grad(ref, (q, c))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad_q, ref_q, rtol=1e-9, atol=1e-12)
    if merge:
        grad_c, ref_c = per_item(grad_c, ids), per_item(ref_c, ids)
    torch.testing.assert_close(grad_c, ref_c, rtol=1e-9, atol=1e-12)


def random_batch(seed: int, b: int = 64, s: int = 64, items: int = 30):
    """Many repeats: 128 candidates over 30 items, a few padding rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, items + 1, (b + s,), generator=gen)
    ids[b - 3:b] = 0
    q = torch.nn.functional.normalize(torch.randn(b, 8, generator=gen, dtype=torch.float64), dim=1)
    table = torch.nn.functional.normalize(torch.randn(items + 1, 8, generator=gen, dtype=torch.float64), dim=1)
    log_q = torch.log(torch.rand(items + 1, generator=gen, dtype=torch.float64) + 0.05)[ids]
    return q.requires_grad_(), table[ids].detach().requires_grad_(), ids, ids[:b] > 0, log_q


@pytest.mark.parametrize("in_batch", [True, False])
def test_merged_duplicates_equal_one_column_per_copy(in_batch):
    q, c, ids, row_mask, log_q = random_batch(3)
    args = dict(num_in_batch=64, temperature=0.1, in_batch=in_batch)
    copies = sampled_softmax_loss(q, c, ids, torch.arange(64), row_mask, log_q, merge=False, **args)
    merged = sampled_softmax_loss(q, c, ids, torch.arange(64), row_mask, log_q, merge=True, **args)
    assert merged.item() == pytest.approx(copies.item(), rel=1e-12)
    (gq, gc), (mq, mc) = torch.autograd.grad(copies, (q, c)), torch.autograd.grad(merged, (q, c))
    torch.testing.assert_close(mq, gq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_item(mc, ids), per_item(gc, ids), rtol=1e-10, atol=1e-12)


def test_merging_without_the_copies_count_is_caught(monkeypatch):
    """The log(copies) raise is what keeps the loss: a merge that drops it differs from one column per copy."""
    q, c, ids, row_mask, log_q = random_batch(3)
    copies = sampled_softmax_loss(q, c, ids, torch.arange(64), row_mask, log_q, num_in_batch=64, temperature=0.1,
                                  merge=False)
    monkeypatch.setattr(loss_module, "log_copies", torch.zeros_like)
    broken = sampled_softmax_loss(q, c, ids, torch.arange(64), row_mask, log_q, num_in_batch=64, temperature=0.1)
    assert abs(broken.item() - copies.item()) > 1e-2


def test_accidental_hits_and_padding_get_no_gradient_from_the_row():
    q, c, ids, row_mask, log_q = case()
    b = q.shape[0]
    loss = sampled_softmax_loss(q[:1], c, ids, torch.tensor([0]), row_mask[:1], log_q, num_in_batch=b,
                                temperature=0.3, merge=False)
    grad_c, = torch.autograd.grad(loss, (c,))
    duplicates = [j for j in range(len(ids)) if ids[j] == ids[0] and j != 0]  # item 7 again: columns 2 and 7
    assert duplicates == [2, 7]
    for j in duplicates + [4]:  # column 4 is the padding row's (id 0)
        assert torch.all(grad_c[j] == 0), j
    assert torch.any(grad_c[1] != 0), "an ordinary negative does get gradient"


def test_padding_rows_do_not_count():
    q, c, ids, row_mask, log_q = case()
    b = q.shape[0]
    pos = torch.arange(b)
    full = sampled_softmax_loss(q, c, ids, pos, row_mask, log_q, num_in_batch=b, temperature=0.3)
    q2 = q.detach().clone()
    q2[4] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # change only the padding row's query
    again = sampled_softmax_loss(q2, c, ids, pos, row_mask, log_q, num_in_batch=b, temperature=0.3)
    assert full.item() == pytest.approx(again.item(), rel=1e-12)


def test_logq_is_expected_candidate_count():
    freq = torch.tensor([0.0, 6.0, 3.0, 1.0])
    proposal = torch.tensor([0.0, 0.2, 0.3, 0.5])
    log_q = CandidateLogQ(freq, Negatives("mixed", True, 10, proposal.numpy()), frequency="exact", buckets=16,
                          alpha=0.1)
    ids = torch.tensor([1, 2, 3, 3])
    got = log_q(ids, global_positives=torch.tensor([1, 2, 3, 3, 1, 1, 2, 3]))
    expected = [math.log(8 * f / 10 + 10 * p) for f, p in zip([6, 3, 1, 1], [0.2, 0.3, 0.5, 0.5])]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_logq_counts_only_real_positives_of_a_padded_batch():
    """The last batch of an epoch is padded with id-0 rows: they draw no in-batch candidate, so G is the
    number of real positives (5 here), not the batch size (8)."""
    freq = torch.tensor([0.0, 6.0, 3.0, 1.0])
    proposal = torch.tensor([0.0, 0.2, 0.3, 0.5])
    log_q = CandidateLogQ(freq, Negatives("mixed", True, 10, proposal.numpy()), frequency="exact", buckets=16,
                          alpha=0.1)
    got = log_q(torch.tensor([1, 2, 3]), global_positives=torch.tensor([1, 2, 3, 3, 1, 0, 0, 0]))
    expected = [math.log(5 * f / 10 + 10 * p) for f, p in zip([6, 3, 1], [0.2, 0.3, 0.5])]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_normalizer_divides_the_summed_loss():
    """What a rank with an uneven share of a padded batch uses: sum over its real rows / (global real / world)."""
    q, c, ids, row_mask, log_q = case()
    b = q.shape[0]
    args = dict(num_in_batch=b, temperature=0.3)
    mean = sampled_softmax_loss(q, c, ids, torch.arange(b), row_mask, log_q, **args)
    scaled = sampled_softmax_loss(q, c, ids, torch.arange(b), row_mask, log_q, normalizer=torch.tensor(2.5), **args)
    assert scaled.item() == pytest.approx(mean.item() * int(row_mask.sum()) / 2.5, rel=1e-12)


def train_free_embeddings(logq_sign: float, seed: int = 0):
    """Free query/item embeddings trained with in-batch negatives on a skewed distribution.

    Items have Zipf popularity and each query context prefers a random subset; with the right sign
    the learned scores approach log p(y|x), the ranking that maximises recall on the true data.
    """
    rng = np.random.default_rng(seed)
    n_items, n_ctx, d, batch, steps = 200, 40, 16, 256, 300
    popularity = 1.0 / np.arange(1, n_items + 1) ** 1.1
    affinity = rng.normal(size=(n_ctx, n_items)) * 1.0
    p_y_given_x = popularity[None, :] * np.exp(affinity)
    p_y_given_x /= p_y_given_x.sum(1, keepdims=True)
    p_item = p_y_given_x.mean(0)
    gen = torch.Generator().manual_seed(seed)
    qe = torch.nn.Parameter(torch.randn(n_ctx, d, generator=gen) * 0.1)
    ie = torch.nn.Parameter(torch.randn(n_items, d, generator=gen) * 0.1)
    opt = torch.optim.Adam([qe, ie], lr=0.05)
    log_p = torch.log(torch.tensor(p_item * batch, dtype=torch.float32))
    cdf = p_y_given_x.cumsum(1)
    for _ in range(steps):
        x = rng.integers(0, n_ctx, batch)
        y = np.minimum((cdf[x] < rng.random(batch)[:, None]).sum(1), n_items - 1)
        ids = torch.from_numpy(y + 1)
        loss = sampled_softmax_loss(qe[x], ie[y], ids, torch.arange(batch), torch.ones(batch, dtype=torch.bool),
                                    logq_sign * log_p[y], num_in_batch=batch, temperature=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = (qe @ ie.T).detach().numpy()
    top = np.argsort(-scores, axis=1)[:, :10]
    recall = float(np.mean([p_y_given_x[x, top[x]].sum() for x in range(n_ctx)]))  # expected recall@10
    tail_share = float(np.mean(top >= n_items // 2))
    return recall, tail_share


def test_logq_sign_on_a_skewed_distribution():
    """Correct sign: highest true recall@10 and the fewest spurious tail items in the top 10.
    Without correction in-batch negatives push popular items down (tail items over-recommended);
    with the sign flipped this gets worse still."""
    right, right_tail = train_free_embeddings(+1.0)
    none, none_tail = train_free_embeddings(0.0)
    flipped, flipped_tail = train_free_embeddings(-1.0)
    assert right > none > flipped, (right, none, flipped)
    assert right_tail < none_tail < flipped_tail, (right_tail, none_tail, flipped_tail)


def test_streaming_estimator_converges_on_a_stationary_stream():
    rng = np.random.default_rng(0)
    n_items, batch = 500, 64
    p = 1.0 / np.arange(1, n_items + 1) ** 1.0
    p /= p.sum()
    est = StreamingFrequency(buckets=1 << 16, alpha=0.01, device=torch.device("cpu"))
    for _ in range(4000):
        est.update(torch.from_numpy(rng.choice(n_items, batch, p=p) + 1))
    ids = torch.arange(1, n_items + 1)
    estimate = est.per_step_count(ids).numpy()
    truth = batch * p
    moderate = truth > 0.05  # rarer items have been seen too few times in 4000 steps to have converged
    assert moderate.sum() > 150
    rel_error = np.abs(estimate[moderate] - truth[moderate]) / truth[moderate]
    assert np.median(rel_error) < 0.1, np.median(rel_error)
    assert np.corrcoef(np.log(estimate[moderate]), np.log(truth[moderate]))[0, 1] > 0.95
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in est.state_dict().items()}
    restored = StreamingFrequency(buckets=1 << 16, alpha=0.01, device=torch.device("cpu"))
    restored.load_state_dict(state)
    assert torch.equal(restored.per_step_count(ids), est.per_step_count(ids)) and restored.step == 4000


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("use_logq", [False, True])
def test_catalogue_negatives_are_the_exact_full_softmax(merge, use_logq):
    """negatives.kind=catalogue: the module the trainer builds, fed a batch as the loader makes it (targets, then
    every item), equals the full-catalogue cross-entropy computed directly, value and gradients, in float64.
    With the in-batch columns left live (kind mixed) it would differ: the check is sharp."""
    from types import SimpleNamespace

    from config import load_config
    from trainer.loss.modules import build_loss

    gen = torch.Generator().manual_seed(3)
    items, b, d, temperature = 12, 6, 4, 0.2
    table = torch.randn(items + 1, d, generator=gen, dtype=torch.float64)
    query = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([3, 7, 3, 12, 1, 0])  # a repeated target, and a padding row
    freq = np.r_[0, np.arange(1, items + 1)]
    results = {}
    for kind in ("catalogue", "mixed"):
        cfg = load_config(None, [f"negatives.kind={kind}", f"loss.temperature={temperature}",
                                 f"loss.logq={str(use_logq).lower()}", f"loss.merge_duplicates={str(merge).lower()}"])
        negatives = Negatives.of(cfg.negatives, freq)
        ids = torch.cat([targets, torch.from_numpy(negatives.sample(np.random.default_rng(0)))])
        embeddings = table.clone().requires_grad_()
        batch = SimpleNamespace(candidate_ids=ids, row_mask=targets > 0)
        loss = build_loss(cfg, negatives, freq, sequence=False)(query, embeddings[ids], batch)
        grads = torch.autograd.grad(loss, [query, embeddings])
        results[kind] = (loss, grads)
    real = targets > 0
    embeddings = table.clone().requires_grad_()
    logits = query[real] @ embeddings[1:].T / temperature
    expected = torch.nn.functional.cross_entropy(logits, targets[real] - 1)
    expected_grads = torch.autograd.grad(expected, [query, embeddings])
    loss, grads = results["catalogue"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert abs(results["mixed"][0].item() - expected.item()) > 1e-3, "the in-batch columns would change it"
