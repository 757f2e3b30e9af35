"""The HSTU tower: one unit against a float64 brute-force reference (values and gradients), causality, a row's
output independent of the padding it is batched with, deliberately broken bias and masks caught; its training run is
tests/towers/test_sequence_model.py's, parametrised over the sequence towers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import towers
from config import load_config
from serving.layers import HSTUBlock, make_block
from serving.sequence import SequenceHead, SequenceShape


def reference_unit(block: HSTUBlock, x: torch.Tensor) -> torch.Tensor:
    """One unit written out row by row, step by step, head by head, from its parameters (eval: no dropout)."""
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
                    out = out + F.silu(q @ k + block.position_bias[i - j]) / block.max_length * v
                heads.append(out)
            attended = F.layer_norm(torch.cat(heads), (d,), block.attention_norm.weight, block.attention_norm.bias,
                                    block.attention_norm.eps)
            gated = uvqk[row, i, :d] * attended
            steps.append(x[row, i] + gated @ block.out.weight.T + block.out.bias)
        rows.append(torch.stack(steps))
    return torch.stack(rows)


def unit(heads: int = 1, max_length: int = 7) -> HSTUBlock:
    torch.manual_seed(0)
    block = HSTUBlock(8, heads, 0.3, max_length).double().eval()
    with torch.no_grad():  # LayerNorms away from their identity start, so that their parameters are checked too
        for norm in (block.input_norm, block.attention_norm):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        block.position_bias.normal_(0.0, 1.0)
    return block


def check_against_reference(block: HSTUBlock) -> None:
    """Values, the input's gradient and every parameter's gradient equal the reference's."""
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, want = block(x), reference_unit(block, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    params = [x] + list(block.parameters())
    got_grads = torch.autograd.grad((got * weights).sum(), params)
    want_grads = torch.autograd.grad((want * weights).sum(), params)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def check_causal(head: SequenceHead) -> None:
    """Changing a later item changes no earlier output of its row, and nothing of another row."""
    lengths = torch.tensor([5, 2, 6])
    history = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(3 * 6)
    base = head.encode(history, lengths, positions).view(3, 6, -1)
    changed = history.clone()
    changed[3] = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))  # row 0, step 3
    after = head.encode(changed, lengths, positions).view(3, 6, -1)
    torch.testing.assert_close(after[0, :3], base[0, :3])
    assert not torch.allclose(after[0, 3:5], base[0, 3:5])
    torch.testing.assert_close(after[1:], base[1:])


def check_padding_free(head: SequenceHead) -> None:
    """Each row encoded alone (no padding) equals the same row in a batch padded to its longest row."""
    lengths = torch.tensor([5, 2, 6, 1])
    history = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    width = int(lengths.max())
    batched = head.encode(history, lengths, torch.arange(len(lengths) * width)).view(len(lengths), width, -1)
    start = 0
    for row, n in enumerate(lengths.tolist()):
        alone = head.encode(history[start:start + n], lengths[row:row + 1], torch.arange(n))
        torch.testing.assert_close(batched[row, :n], alone, rtol=1e-10, atol=1e-12)
        start += n


def hstu_head() -> SequenceHead:
    torch.manual_seed(0)
    cfg = SequenceShape(item_dim=8, blocks=2, heads=2, dropout=0.2, hidden_dims=[8], output_dim=4, block="silu")
    head = SequenceHead(cfg, 6, 0, 0, torch.device("cpu")).double().eval()
    with torch.no_grad():
        for block in head.blocks:
            block.position_bias.normal_(0.0, 1.0)
    return head


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_an_hstu_unit_equals_the_brute_force_reference_values_and_gradients(heads):
    check_against_reference(unit(heads))


def test_a_position_never_sees_the_future_nor_other_rows():
    check_causal(hstu_head())


def test_a_rows_output_does_not_depend_on_the_padding_it_is_batched_with():
    check_padding_free(hstu_head())


def broken_bias(self, q, k):
    """The bias indexed by j - i (the future's distances) instead of i - j."""
    n = q.shape[-2]
    steps = torch.arange(n)
    distance = steps[:, None] - steps[None, :]
    bias = self.position_bias[(-distance).clamp(min=0, max=self.max_length - 1)]
    return (F.silu(q @ k.transpose(-2, -1) + bias) / self.max_length).masked_fill(distance < 0, 0.0)


def no_mask(self, q, k):
    n = q.shape[-2]
    steps = torch.arange(n)
    distance = (steps[:, None] - steps[None, :]).abs()
    return F.silu(q @ k.transpose(-2, -1) + self.position_bias[distance]) / self.max_length


CORRECT_WEIGHTS = HSTUBlock.weights


def width_scaled(self, q, k):
    """Divided by the batch's width instead of the configured max length."""
    return CORRECT_WEIGHTS(self, q, k) * (self.max_length / q.shape[-2])


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


def test_the_block_kind_is_checked_and_built():
    assert isinstance(make_block("silu", 8, 2, 0.1, 5), HSTUBlock)
    with pytest.raises(ValueError, match="SequenceShape.block must be one of"):
        SequenceShape(item_dim=8, blocks=1, heads=1, dropout=0.0, hidden_dims=[], output_dim=4, block="relu")
    cfg = towers.resolve(load_config(None, ["model.query_tower=hstu", "model.tower.blocks=3",
                                            "model.tower.dropout=0.4"]))
    section = cfg.model.tower
    assert type(section).__name__ == "HSTUConfig" and (section.blocks, section.dropout) == (3, 0.4)
