"""A checkpoint that lacks one of the model's tensors (written before the model gained it) is refused with a
one-line error naming the tensor, not DCP's per-rank traceback."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from trainer.checkpointing.checkpoint import CheckpointError, read


class Grown(nn.Module):
    """A model that gained a parameter after the checkpoint was written (as HSTU's units gained time_bias)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)
        self.time_bias = nn.Parameter(torch.zeros(4))


def test_a_tensor_the_checkpoint_lacks_is_named(tmp_path):
    old = nn.Module()
    old.proj = nn.Linear(3, 2)
    dcp.save({"model": old.state_dict()}, checkpoint_id=str(tmp_path), no_dist=True)
    with pytest.raises(CheckpointError, match=r"has no tensor 'model\.time_bias', which this model has.*"
                                              r"start a new checkpoint\.dir") as caught:
        read({"model": Grown()}, str(tmp_path), no_dist=True)
    assert "\n" not in str(caught.value)


def test_a_complete_checkpoint_still_loads(tmp_path):
    saved = Grown()
    nn.init.normal_(saved.time_bias)
    dcp.save({"model": saved.state_dict()}, checkpoint_id=str(tmp_path), no_dist=True)
    loaded = Grown()
    read({"model": loaded}, str(tmp_path), no_dist=True)
    assert torch.equal(loaded.time_bias, saved.time_bias) and torch.equal(loaded.proj.weight, saved.proj.weight)
