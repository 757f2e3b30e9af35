"""Dev-mode training: the pipeline equals the plain loop, the EBC is pipelined, the job learns."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from config import ConfigError, load_config
from data.schema import Metadata
from tests.conftest import ROOT, TINY_MODEL, tiny_config
from trainer import distributed
from trainer.state import LoopState
from trainer.train import build, train


def pipelined_and_plain_losses(cfg, steps: int) -> tuple[list[float], list[float], list[str]]:
    """Losses of `steps` batches through TrainPipelineSparseDist and through a plain forward/backward loop
    (two builds of the same config), and the names of the modules the pipeline pipelined."""
    env = distributed.init("cpu")
    first = build(cfg, env)
    batches = list(first.data.train_loader.epoch(0))[:steps]
    iterator = iter(copy.deepcopy(batches))
    pipelined = [float(first.model.pipeline.progress(iterator)["loss"]) for _ in batches]
    plain = build(cfg, env).model
    losses = []
    for batch in batches:
        loss, _ = plain.dmp(batch)
        loss.backward()
        plain.dense_optimizer.step()
        plain.dense_optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return pipelined, losses, sorted(type(m).__name__ for m in first.model.pipeline._pipelined_modules)


def test_pipelined_losses_equal_the_plain_loop(tiny_data):
    pipelined, plain, modules = pipelined_and_plain_losses(tiny_config(tiny_data), 6)
    assert modules == ["ShardedEmbeddingBagCollection"], \
        "the EBC must be pipelined (input_dist ahead of forward), not left out of the pipeline"
    assert plain[0] != plain[-1], "training moved the parameters"
    torch.testing.assert_close(torch.tensor(pipelined), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_the_dense_adam_is_torchs_fused_one(tiny_data):
    """One kernel over every MLP tensor instead of a loop over them: a fixed cost of every step
    (bench/train_step.py)."""
    groups = build(tiny_config(tiny_data), distributed.init("cpu")).model.dense_optimizer.param_groups
    assert groups and all(g["fused"] is True for g in groups)


@pytest.mark.slow
def test_dev_mode_training_beats_popularity_and_is_reproducible(tiny_data):
    cfg = tiny_config(tiny_data, **{"train.epochs": 3, "train.early_stopping_metric": "hr@50"})
    first = train(cfg)
    assert first["test"]["hr@50"] > 1.5 * first["popularity_test"]["hr@50"], (first["test"], first["popularity_test"])
    assert first["test"]["users"] == Metadata.load(tiny_data).counts["test_rows"] and first["test"]["skipped"] == 0
    assert "export" not in first, "export.enabled=false (the tiny model's setting) writes no export"
    second = train(cfg)
    assert second["test"] == first["test"], "same config and data give the same metrics"


def test_streaming_frequency_separate_item_tables_and_user_id_train(tiny_data):
    cfg = tiny_config(tiny_data, **{"loss.frequency": "streaming", "model.share_item_table": "false",
                                    "loader.use_user_id": "true"})
    job = build(cfg, distributed.init("cpu"))
    assert {"history_item_ids", "candidate_item_ids", "user_ids"} <= {t.name for t in job.model.towers.tables}
    assert "user_id" in job.model.towers.query_keys
    iterator = iter(job.data.train_loader.epoch(0))
    losses = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert job.model.frequency is not None and job.model.frequency.step == 8, "updated once per step"
    assert (job.model.frequency.gap > 0).sum() > 50, "positives seen so far have frequency estimates"


def test_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key model.hiden_dims"):
        load_config(None, ["model.hiden_dims=[3]"])
    with pytest.raises(ConfigError, match="loader.batch_size: expected int"):
        load_config(None, ["loader.batch_size=big"])
    with pytest.raises(ConfigError, match="no negatives"):
        load_config(None, ["loss.in_batch=false", "loader.num_negatives=0"])
    with pytest.raises(ConfigError, match="early_stopping_metric"):
        load_config(None, ["train.early_stopping_metric=hr@7"])
    with pytest.raises(ConfigError, match="unknown key loader.seed"):
        load_config(None, ["loader.seed=3"])
    with pytest.raises(ConfigError, match="1/temperature a finite float32, got 1e-40"):
        load_config(None, ["loss.temperature=1e-40"])
    cfg = load_config("configs/synthetic.yaml", ["seed=7", "loss.temperature=1"])
    assert cfg.loader.seed == 7 and cfg.loss.temperature == 1.0
    assert load_config(None, ["loss.temperature=1e-3"]).loss.temperature == 1e-3, "YAML 1.1 reads 1e-3 as text"


def test_adam_on_cpu_is_refused_before_work(tiny_data):
    cfg = tiny_config(tiny_data, **{"optim.sparse": "adam"})
    with pytest.raises(ConfigError, match="needs a GPU"):
        build(cfg, distributed.init("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (nccl, FBGEMM CUDA kernels, fused Adam)")
@pytest.mark.parametrize("tower", ["bags", "transformer"])
def test_gpu_dev_mode_trains_with_fused_adam_on_nccl(tiny_data, tmp_path, tower):
    """A fresh process, so the process group is created for CUDA (nccl), not reused from CPU tests. The item
    table (the EBC's, or the transformer's EmbeddingCollection) row-wise, the others table-wise."""
    summary = tmp_path / "summary.json"
    towers = ["model.query_tower=transformer", "loader.max_sequence_length=20"] if tower == "transformer" else []
    result = subprocess.run([sys.executable, "-m", "trainer", f"data.path={tiny_data}", *TINY_MODEL, *towers,
                             "tracking.enabled=false", "train.device=cuda", "optim.sparse=adam", "train.epochs=2",
                             "sharding.sharding_types=[table_wise]", "sharding.per_table={item_ids: [row_wise]}",
                             "--summary", str(summary)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank:0/cuda:0" in result.stdout, "tables placed on the GPU"
    assert re.search(r"item_ids\s*\|\s*row_wise", result.stdout), result.stdout[-3000:]
    metrics = json.loads(summary.read_text())
    assert metrics["test"]["hr@50"] > metrics["popularity_test"]["hr@50"]


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_stops_after_patience_epochs_without_improvement(patience):
    """As in Keras and Lightning: patience N trains N epochs past the best one, then stops."""
    state, ran = LoopState(), 0
    for epoch, value in enumerate([0.1, 0.3, 0.2, 0.25, 0.28, 0.29, 0.5]):
        if state.stopped:
            break
        state.select(epoch, value, patience)
        ran += 1
    assert (state.best_epoch, ran, state.epochs_without_improvement) == (1, 2 + patience, patience)


@pytest.mark.slow
def test_training_stops_one_epoch_after_the_best_with_patience_one(tiny_data):
    summary = train(tiny_config(tiny_data, **{"train.epochs": 12, "train.early_stopping_patience": 1,
                                              "eval.popularity_baseline": "false"}))
    assert len(summary["history"]) < 12, "stopped early"
    assert len(summary["history"]) == summary["best_epoch"] + 2
