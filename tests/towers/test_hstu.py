"""The HSTU tower: one unit against a float64 brute-force reference (values and gradients), with and without the
time-gap bias; causality, in items and in times; a row's output independent of the padding it is batched with;
deliberately broken bias, masks and time gaps caught; its training run is tests/towers/test_sequence_model.py's,
parametrised over the sequence towers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import serving.layers
import towers
from config import load_config
from serving.layers import TIME_BUCKETS, HSTUBlock, make_block, time_gap_buckets
from serving.sequence import SequenceHead, SequenceShape

TIMED = [0, TIME_BUCKETS]  # the unit without and with its time-gap bias


def reference_bucket(gap: int, buckets: int) -> int:
    """HSTU's bucket of a gap in seconds, from its definition: floor(ln(max(|gap|, 1)) / 0.301), at most `buckets`."""
    return min(math.floor(math.log(max(abs(gap), 1)) / 0.301), buckets)


def random_times(rows: int, n: int, seed: int) -> torch.Tensor:
    """(rows, n) increasing unix times whose gaps span seconds to months, so that many buckets are used."""
    gaps = torch.exp(torch.rand(rows, n, generator=torch.Generator().manual_seed(seed)) * 16).long()
    return 1_600_000_000 + gaps.cumsum(dim=1)


def reference_unit(block: HSTUBlock, x: torch.Tensor, times: torch.Tensor | None = None) -> torch.Tensor:
    """One unit written out row by row, step by step, head by head, from its parameters (eval: no dropout); with
    `times` (rows, n + 1), step i's bias on step j adds the bucket of times[i + 1] - times[j]."""
    b, n, d = x.shape
    h = d // block.heads
    normed = F.layer_norm(x, (d,), block.input_norm.weight, block.input_norm.bias, block.input_norm.eps)
    uvqk = F.silu(normed @ block.uvqk.weight.T + block.uvqk.bias)
    rows = []
    for row in range(b):
        steps = []
        for i in range(n):
            heads = []
            for head in range(block.heads):
                part = slice(head * h, (head + 1) * h)
                q = uvqk[row, i, 2 * d:3 * d][part]
                out = torch.zeros(h, dtype=x.dtype)
                for j in range(i + 1):
                    k = uvqk[row, j, 3 * d:][part]
                    v = uvqk[row, j, d:2 * d][part]
                    bias = block.position_bias[i - j]
                    if times is not None:
                        gap = int(times[row, i + 1]) - int(times[row, j])
                        bias = bias + block.time_bias[reference_bucket(gap, len(block.time_bias) - 1)]
                    out = out + F.silu(q @ k + bias) / block.max_length * v
                heads.append(out)
            attended = F.layer_norm(torch.cat(heads), (d,), block.attention_norm.weight, block.attention_norm.bias,
                                    block.attention_norm.eps)
            gated = uvqk[row, i, :d] * attended
            steps.append(x[row, i] + gated @ block.out.weight.T + block.out.bias)
        rows.append(torch.stack(steps))
    return torch.stack(rows)


def unit(heads: int = 1, max_length: int = 7, time_buckets: int = 0) -> HSTUBlock:
    torch.manual_seed(0)
    block = HSTUBlock(8, heads, 0.3, max_length, time_buckets).double().eval()
    with torch.no_grad():  # LayerNorms away from their identity start, so that their parameters are checked too
        for norm in (block.input_norm, block.attention_norm):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        block.position_bias.normal_(0.0, 1.0)
        if block.time_bias is not None:
            block.time_bias.normal_(0.0, 1.0)
    return block


def check_against_reference(block: HSTUBlock) -> None:
    """Values, the input's gradient and every parameter's gradient equal the reference's."""
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    times = random_times(3, 6, 7) if block.time_bias is not None else None
    gaps = None if times is None else serving.layers.time_gap_buckets(times, len(block.time_bias) - 1)
    got, want = block(x, gaps), reference_unit(block, x, times)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [x] + list(block.parameters())
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def padded_times(lengths: torch.Tensor, seed: int) -> torch.Tensor:
    """A batch's `times` as the loader builds them: each row's items' times and its query's, zeros after."""
    width = int(lengths.max())
    times = random_times(len(lengths), width + 1, seed)
    return times * (torch.arange(width + 1)[None, :] <= lengths[:, None])


def check_causal(head: SequenceHead) -> None:
    """Changing a later item, or a later event's time, changes no earlier output of its row, and nothing of another
    row."""
    lengths = torch.tensor([5, 2, 6])
    history = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    times = padded_times(lengths, 8) if head.time_buckets else None
    positions = torch.arange(3 * 6)
    base = head.encode(history, lengths, positions, times).view(3, 6, -1)
    changed = history.clone()
    changed[3] = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))  # row 0, step 3
    after = head.encode(changed, lengths, positions, times).view(3, 6, -1)
    torch.testing.assert_close(after[0, :3], base[0, :3])
    assert not torch.allclose(after[0, 3:5], base[0, 3:5])
    torch.testing.assert_close(after[1:], base[1:])
    if times is not None:  # row 0's event 4 is what step 3 predicts: steps 0-2 cannot read its time
        later = times.clone()
        later[0, 4] += 10_000_000
        moved = head.encode(history, lengths, positions, later).view(3, 6, -1)
        torch.testing.assert_close(moved[0, :3], base[0, :3])
        assert not torch.allclose(moved[0, 3:5], base[0, 3:5])
        torch.testing.assert_close(moved[1:], base[1:])


def check_padding_free(head: SequenceHead) -> None:
    """Each row encoded alone (no padding) equals the same row in a batch padded to its longest row."""
    lengths = torch.tensor([5, 2, 6, 1])
    history = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    times = padded_times(lengths, 9) if head.time_buckets else None
    width = int(lengths.max())
    batched = head.encode(history, lengths, torch.arange(len(lengths) * width), times).view(len(lengths), width, -1)
    start = 0
    for row, n in enumerate(lengths.tolist()):
        alone = head.encode(history[start:start + n], lengths[row:row + 1], torch.arange(n),
                            None if times is None else times[row:row + 1, :n + 1])
        torch.testing.assert_close(batched[row, :n], alone, rtol=1e-10, atol=1e-12)
        start += n


def hstu_head(time_buckets: int = 0) -> SequenceHead:
    torch.manual_seed(0)
    cfg = SequenceShape(item_dim=8, blocks=2, heads=2, dropout=0.2, hidden_dims=[8], output_dim=4, block="silu",
                        time_buckets=time_buckets)
    head = SequenceHead(cfg, 6, 0, 0, torch.device("cpu")).double().eval()
    with torch.no_grad():
        for block in head.blocks:
            block.position_bias.normal_(0.0, 1.0)
            if block.time_bias is not None:
                block.time_bias.normal_(0.0, 1.0)
    return head


@pytest.mark.parametrize("time_buckets", TIMED)
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_an_hstu_unit_equals_the_brute_force_reference_values_and_gradients(heads, time_buckets):
    check_against_reference(unit(heads, time_buckets=time_buckets))


@pytest.mark.parametrize("time_buckets", TIMED)
def test_a_position_never_sees_the_future_nor_other_rows(time_buckets):
    check_causal(hstu_head(time_buckets))


@pytest.mark.parametrize("time_buckets", TIMED)
def test_a_rows_output_does_not_depend_on_the_padding_it_is_batched_with(time_buckets):
    check_padding_free(hstu_head(time_buckets))


def test_time_gap_buckets_equal_their_definition_and_the_bias_needs_times():
    times = torch.tensor([[0, 1, 2, 4, 100, 10**6, 10**9, 10**18]])
    got = time_gap_buckets(times, 64)
    n = times.shape[1] - 1
    want = [[reference_bucket(int(times[0, i + 1]) - int(times[0, j]), 64) for j in range(n)] for i in range(n)]
    assert got[0].tolist() == want
    assert int(got.max()) == 64, "gaps beyond the last bucket are capped"
    with pytest.raises(ValueError, match="needs the events' times"):
        unit(time_buckets=TIME_BUCKETS)(torch.zeros(1, 3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"reads event times.*shape \(2, 4\); got none"):
        hstu_head(TIME_BUCKETS).encode(torch.zeros(4, 8, dtype=torch.float64), torch.tensor([3, 1]),
                                       torch.arange(2))
    with pytest.raises(ValueError, match="time_buckets needs the 'silu' block"):
        SequenceShape(item_dim=8, blocks=1, heads=1, dropout=0.0, hidden_dims=[], output_dim=4, time_buckets=8)


def broken_bias(self, q, k, gaps=None, mask=None):
    """The bias indexed by j - i (the future's distances) instead of i - j."""
    n = q.shape[-2]
    steps = torch.arange(n)
    distance = steps[:, None] - steps[None, :]
    bias = self.position_bias[(-distance).clamp(min=0, max=self.max_length - 1)]
    return (F.silu(q @ k.transpose(-2, -1) + bias) / self.max_length).masked_fill(distance < 0, 0.0)


def no_mask(self, q, k, gaps=None, mask=None):
    n = q.shape[-2]
    steps = torch.arange(n)
    distance = (steps[:, None] - steps[None, :]).abs()
    return F.silu(q @ k.transpose(-2, -1) + self.position_bias[distance]) / self.max_length


CORRECT_WEIGHTS = HSTUBlock.weights


def width_scaled(self, q, k, gaps=None, mask=None):
    """Divided by the batch's width instead of the configured max length."""
    return CORRECT_WEIGHTS(self, q, k, gaps, mask) * (self.max_length / q.shape[-2])


CORRECT_BUCKETS = serving.layers.time_gap_buckets


def gap_to_own_event(times, buckets=TIME_BUCKETS):
    """Gaps from step i's own event (times[:, i]) rather than the one it predicts (times[:, i + 1])."""
    return CORRECT_BUCKETS(torch.cat([times[:, :1], times[:, :-1]], dim=1), buckets)


def log2_buckets(times, buckets=TIME_BUCKETS):
    """Buckets of log2 rather than HSTU's width."""
    gaps = (times[:, 1:, None] - times[:, None, :-1]).abs().clamp(min=1).double()
    return gaps.log2().long().clamp(max=buckets)


@pytest.mark.parametrize("broken, checks", [(broken_bias, ["reference"]),
                                            (no_mask, ["reference", "causal", "padding"]),
                                            (width_scaled, ["reference", "padding"])])
def test_a_deliberately_broken_unit_fails_the_checks(monkeypatch, broken, checks):
    monkeypatch.setattr(HSTUBlock, "weights", broken)
    run = {"reference": lambda: check_against_reference(unit(max_length=9)),
           "causal": lambda: check_causal(hstu_head()), "padding": lambda: check_padding_free(hstu_head())}
    for name in checks:
        with pytest.raises(AssertionError):
            run[name]()


@pytest.mark.parametrize("broken", [gap_to_own_event, log2_buckets])
def test_deliberately_broken_time_gaps_fail_the_reference(monkeypatch, broken):
    check_against_reference(unit(time_buckets=TIME_BUCKETS))
    monkeypatch.setattr(serving.layers, "time_gap_buckets", broken)
    with pytest.raises(AssertionError):
        check_against_reference(unit(time_buckets=TIME_BUCKETS))


def test_the_block_kind_is_checked_and_built():
    assert isinstance(make_block("silu", 8, 2, 0.1, 5), HSTUBlock)
    with pytest.raises(ValueError, match="SequenceShape.block must be one of"):
        SequenceShape(item_dim=8, blocks=1, heads=1, dropout=0.0, hidden_dims=[], output_dim=4, block="relu")
    cfg = towers.resolve(load_config(None, ["model.query_tower=hstu", "model.tower.blocks=3",
                                            "model.tower.dropout=0.4"]))
    section = cfg.model.tower
    assert type(section).__name__ == "HSTUConfig" and (section.blocks, section.dropout) == (3, 0.4)
