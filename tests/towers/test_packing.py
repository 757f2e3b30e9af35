"""Rows packed several to a lane (loader.pack_rows): the lanes data.ragged.pack_lanes chooses, the stack's outputs
and gradients equal to padding each row (float64, both block kinds, with and without time gaps), deliberately
broken packing caught, and the training losses of packed batches equal to padded ones through TorchRec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.ragged import pack_lanes
from serving.layers import TIME_BUCKETS
from serving.sequence import Grid, SequenceHead, SequenceShape
from tests.conftest import tiny_config, tower_overrides
from tests.towers.test_hstu import padded_times
from trainer import distributed
from trainer.loop import build

LENGTHS = [5, 2, 6, 1, 3, 0, 4, 6]  # width 6: 27 items in 5 lanes (6 | 6 | 5+1 | 4+2 | 3) instead of 8 rows
HEADS = [("softmax", 0), ("silu", 0), ("silu", TIME_BUCKETS)]


def test_pack_lanes_places_every_row_whole_without_overlap_first_fit_decreasing():
    lanes = pack_lanes(np.array(LENGTHS), 6)
    # Longest first (6, 6, 5, 4, 3, 2, 1), each into the first lane with room: the 3 opens lane 4, the 2 joins
    # the 4 and the 1 joins the 5.
    assert lanes.tolist() == [[2, 0], [3, 4], [0, 0], [2, 5], [4, 0], [0, 0], [3, 0], [1, 0]]
    used = {}
    for (lane, start), n in zip(lanes.tolist(), LENGTHS):
        cells = {(lane, start + i) for i in range(n)}
        assert all(0 <= c < 6 for _, c in cells), "a row stays inside its lane"
        assert not cells & set(used), "rows never overlap"
        used.update(dict.fromkeys(cells))
    assert pack_lanes(np.zeros(3, dtype=np.int64), 1).tolist() == [[0, 0]] * 3
    with pytest.raises(ValueError, match="a row of 7 items does not fit a lane of 6"):
        pack_lanes(np.array([7, 1]), 6)


def head(block: str, time_buckets: int) -> SequenceHead:
    torch.manual_seed(0)
    shape = SequenceShape(item_dim=8, blocks=2, heads=2, dropout=0.2, hidden_dims=[8], output_dim=4, block=block,
                          time_buckets=time_buckets, input_norm=True)
    model = SequenceHead(shape, 6, 0, 0, torch.device("cpu"), bags=(1, 3, 0)).double().eval()
    with torch.no_grad():
        for unit in model.blocks:
            for p in (getattr(unit, "position_bias", None), getattr(unit, "time_bias", None)):
                if p is not None:
                    p.normal_(0.0, 1.0)
    return model


def check_packed_equals_padded(model: SequenceHead, device: str = "cpu") -> None:
    """Every real position's output (stack and bags), the history's gradient and every parameter's: packed as
    padded."""
    lengths = torch.tensor(LENGTHS)
    width = int(lengths.max())
    history = torch.randn(int(lengths.sum()), 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    times = padded_times(lengths, 8) if model.time_buckets else None
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    positions = row * width + torch.arange(len(row)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    weights = torch.randn(len(positions), 8 * 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    lanes = torch.from_numpy(pack_lanes(lengths.numpy(), width))
    history, lengths, positions, weights, lanes = (t.to(device) for t in (history, lengths, positions, weights, lanes))
    times = None if times is None else times.to(device)
    history.requires_grad_(True)
    padded_out = model.encode(history, lengths, positions, times)
    packed_out = model.encode(history, lengths, positions, times, lanes)
    torch.testing.assert_close(packed_out, padded_out, rtol=1e-10, atol=1e-12)
    params = [history] + list(model.parameters())
    want = torch.autograd.grad((padded_out * weights).sum(), params, allow_unused=True)
    got = torch.autograd.grad((packed_out * weights).sum(), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block, time_buckets", HEADS)
def test_packed_rows_give_the_padded_outputs_and_gradients(block, time_buckets):
    model = head(block, time_buckets)
    check_packed_equals_padded(model)
    grid = Grid.of(torch.tensor(LENGTHS), torch.from_numpy(pack_lanes(np.array(LENGTHS), 6)))
    assert (grid.lanes, grid.width) == (5, 6), "the stack runs on 5 lanes, not 8 rows"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (packed rows on CUDA)")
@pytest.mark.parametrize("block, time_buckets", HEADS)
def test_packed_rows_give_the_padded_outputs_on_the_gpu(block, time_buckets):
    check_packed_equals_padded(head(block, time_buckets).cuda(), "cuda")


CORRECT_MASKS = Grid.masks


def lane_causal(self):
    """Causal over the whole lane: a row reads the rows packed before it."""
    mask, first = CORRECT_MASKS(self)
    columns = torch.arange(self.width)
    return (columns[:, None] >= columns[None, :]).expand_as(mask), first


def bags_from_lane_start(self):
    """The history bags summed from the lane's start rather than the row's."""
    mask, first = CORRECT_MASKS(self)
    return mask, torch.zeros_like(first)


@pytest.mark.parametrize("block, time_buckets", HEADS)
@pytest.mark.parametrize("broken", ["mask", "bags", "steps"])
def test_deliberately_broken_packing_fails_the_check(monkeypatch, block, time_buckets, broken):
    model = head(block, time_buckets)
    if broken == "mask":
        monkeypatch.setattr(Grid, "masks", lane_causal)
    elif broken == "bags":
        monkeypatch.setattr(Grid, "masks", bags_from_lane_start)
    else:
        monkeypatch.setattr(Grid, "place", wrong_steps(Grid.place))
    with pytest.raises(AssertionError):
        check_packed_equals_padded(model)


def wrong_steps(place):
    """Grid.place, except that the steps it places (the position embeddings' indices) are the lane's columns."""
    def broken(self, values, fill=0):
        if values is self.steps:
            values = self.slots % self.width
        return place(self, values, fill)
    return broken


@pytest.mark.parametrize("tower", ["transformer", "hstu"])
def test_packed_batches_train_like_padded_ones_and_compute_less_padding(tiny_data, tower):
    """loader.pack_rows reaches the loader and the model: the same losses, step after step, on fewer computed
    positions (dropout off, so that the two draw nothing)."""
    losses, computed = {}, {}
    for pack in ("true", "false"):
        cfg = tiny_config(tiny_data, **tower_overrides(tower), **{"model.tower.dropout": 0.0, "loader.pack_rows": pack,
                                                                   "loader.batch_size": 16})
        job = build(cfg, distributed.init("cpu"))
        batches = list(job.data.train_loader.epoch(0))[:6]
        assert all(b.lanes.numel() > 0 for b in batches) is (pack == "true")
        computed[pack], real = np.array([b.stack_positions() for b in batches]).sum(0)
        iterator = iter(batches)
        losses[pack] = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in batches]
    assert computed["true"] < 0.8 * computed["false"] and computed["true"] >= real, computed
    assert losses["true"][0] != losses["true"][-1], "training moved the parameters"
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-5, atol=1e-6)
