"""train.precision=bf16: the loss kernel's bfloat16 products against the float64 reference, the setting reaching
every tower's step, evaluation staying float32, and the warning on CPUs without bf16 instructions."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY_MODEL, TINY_TOWERS, tiny_config, tower_overrides
from tests.trainer.test_loss import brute_force, per_item
from trainer import distributed, precision
from trainer.loop import build, seed_everything
from trainer.loss.kernel import sampled_softmax_loss


def float32_batch(seed: int = 5, b: int = 48, s: int = 80, items: int = 60, d: int = 16):
    """Unit vectors in float32 (what the towers give the loss), 128 candidates over 60 items, 3 padding rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, items + 1, (b + s,), generator=gen)
    ids[b - 3:b] = 0
    table = torch.nn.functional.normalize(torch.randn(items + 1, d, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    log_q = torch.log(torch.rand(items + 1, generator=gen) + 0.05)[ids]
    return q.requires_grad_(), table[ids].detach().requires_grad_(), ids, ids[:b] > 0, log_q


def loss_and_gradients(q, c, ids, row_mask, log_q, **kwargs):
    loss = sampled_softmax_loss(q, c, ids, torch.arange(q.shape[0]), row_mask, log_q, num_in_batch=q.shape[0],
                                temperature=0.05, **kwargs)
    grad_q, grad_c = torch.autograd.grad(loss, (q, c))
    return loss.detach().double(), grad_q.double(), per_item(grad_c, ids).double()


def reference(q, c, ids, row_mask, log_q):
    """The float64 kernel on the same float32 inputs: tests/trainer/test_loss.py holds it to the brute-force
    definition; here it is checked against it once more on the first 6 rows (the loop is slow)."""
    q64, c64 = q.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    ref, grad_q, grad_c = loss_and_gradients(q64, c64, ids, row_mask, log_q.double(), merge=False)
    rows = torch.arange(q.shape[0]) < 6
    brute = brute_force(q64, c64, ids.tolist(), list(range(q.shape[0])), (row_mask & rows).tolist(),
                        log_q.double(), q.shape[0], 0.05, True, True)
    kernel = sampled_softmax_loss(q64, c64, ids, torch.arange(q.shape[0]), row_mask & rows, log_q.double(),
                                  num_in_batch=q.shape[0], temperature=0.05, merge=False)
    assert kernel.item() == pytest.approx(brute.item(), rel=1e-9)
    return ref, grad_q, grad_c


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def batch_and_reference():
    batch = float32_batch()
    return batch, reference(*batch)


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("max_logits", [1 << 20, 300])  # one chunk, or 3 rows a chunk
def test_bfloat16_products_match_the_float64_reference(batch_and_reference, merge, max_logits):
    """Value within 0.05%, gradients within 2% of their largest entry, at temperature 0.05 (logits up to 20). The
    gradients' error is the bfloat16 rounding of the softmax entering their products (about 1% measured)."""
    batch, (ref, ref_q, ref_c) = batch_and_reference
    loss, grad_q, grad_c = loss_and_gradients(*batch, merge=merge, max_logits=max_logits,
                                              matmul_dtype=torch.bfloat16)
    assert float(abs(loss - ref) / ref) < 5e-4
    assert relative_error(grad_q, ref_q) < 2e-2
    assert relative_error(grad_c, ref_c) < 2e-2


def test_float32_products_are_exact_to_float32(batch_and_reference):
    """The default path (no matmul_dtype) is untouched: float32 rounding only."""
    batch, (ref, ref_q, ref_c) = batch_and_reference
    loss, grad_q, grad_c = loss_and_gradients(*batch)
    assert float(abs(loss - ref) / ref) < 1e-5
    assert relative_error(grad_q, ref_q) < 1e-4 and relative_error(grad_c, ref_c) < 1e-4


def test_a_loss_run_wholly_in_bfloat16_fails_the_same_bounds(batch_and_reference):
    """The value bound above can fail: the naive mixed precision (embeddings cast to bfloat16, so that the
    exponentials and sums run in it too) is 2.8e-3 off on this batch, about 10 times the kernel's error."""
    (q, c, ids, row_mask, log_q), (ref, ref_q, ref_c) = batch_and_reference
    q16, c16 = q.detach().bfloat16().requires_grad_(), c.detach().bfloat16().requires_grad_()
    loss, grad_q, grad_c = loss_and_gradients(q16, c16, ids, row_mask, log_q.bfloat16())
    assert float(abs(loss - ref) / ref) > 5e-4, "the value bound is too loose to tell the naive way from the kernel"


def first_losses(cfg, steps: int = 3) -> list[float]:
    seed_everything(cfg.seed)
    job = build(cfg, distributed.init("cpu"))
    data = iter(job.data.train_loader.epoch(0))
    return [float(job.model.pipeline.progress(data)["loss"]) for _ in range(steps)]


@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_each_towers_step_runs_in_bfloat16_when_asked(tiny_data, tower):
    """Same seed and batches: bf16 losses are close to fp32's but not equal (the setting reaches the step), and
    the job still trains."""
    fp32 = first_losses(tiny_config(tiny_data, **tower_overrides(tower)))
    bf16 = first_losses(tiny_config(tiny_data, **tower_overrides(tower), **{"train.precision": "bf16"}))
    assert all(torch.isfinite(torch.tensor(bf16)))
    assert bf16 != fp32, "train.precision=bf16 changed nothing: the step ignores it"
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=0)


def test_evaluation_scores_are_float32_after_bfloat16_training(tiny_data):
    cfg = tiny_config(tiny_data, **tower_overrides("transformer"), **{"train.precision": "bf16"})
    job = build(cfg, distributed.init("cpu"))
    batch = next(iter(job.data.eval_loaders["valid"].epoch(0)))
    job.model.dmp.eval()
    assert job.model.scorer(job.data, torch.device("cpu"))(batch).dtype == torch.float32


def test_an_unknown_precision_is_a_config_error():
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        load_config(None, ["train.precision=fp16"])


@pytest.mark.parametrize("flags,expected", [("fpu avx512f avx512_bf16 amx_tile", True), ("fpu avx2 avx512f", False)])
def test_bf16_instructions_are_read_from_cpuinfo(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert precision.cpu_has_bf16(cpuinfo) is expected
    assert precision.cpu_has_bf16(tmp_path / "absent") is None


def test_bf16_on_a_cpu_without_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="trainer.precision"):
        precision.warn_if_slow("bf16", torch.device("cpu"))
        precision.warn_if_slow("fp32", torch.device("cpu"))
    assert len(caplog.records) == 1 and "set train.precision=fp32" in caplog.records[0].getMessage()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bfloat16 autocast on CUDA)")
@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_gpu_training_in_bfloat16_beats_popularity(tiny_data, tmp_path, tower):
    summary = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "trainer", f"data.path={tiny_data}", *TINY_MODEL,
                             *TINY_TOWERS[tower], "tracking.enabled=false", "train.device=cuda",
                             "train.precision=bf16", "train.epochs=2", "--summary", str(summary)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(summary.read_text())
    assert metrics["test"]["hr@50"] > metrics["popularity_test"]["hr@50"]
