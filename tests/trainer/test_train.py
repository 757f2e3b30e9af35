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
import yaml

from config import ConfigError, load_config, load_config_text
from data.schema import Metadata
from tests.conftest import ROOT, TINY_MODEL, TINY_TOWERS, tiny_config, tower_overrides
from trainer import distributed
from trainer.checkpointing.state import LoopState
from trainer.loop import build, train


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
    cfg = tiny_config(tiny_data, **{"loss.frequency": "streaming", "model.tower.share_item_table": "false",
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
    with pytest.raises(ConfigError, match="negatives.kind=uniform draws negatives.num_sampled >= 1 items, got 0"):
        load_config(None, ["negatives.kind=uniform", "negatives.num_sampled=0"])
    with pytest.raises(ConfigError, match="negatives.kind must be one of .*got 'unigram'"):
        load_config(None, ["negatives.kind=unigram"])
    with pytest.raises(ConfigError, match="unknown key loader.num_negatives .*; loader.num_negatives is now "
                                          "negatives.num_sampled"):
        load_config(None, ["loader.num_negatives=16"])
    with pytest.raises(ConfigError, match="early_stopping_metric"):
        load_config(None, ["train.early_stopping_metric=hr@7"])
    with pytest.raises(ConfigError, match="unknown key loader.seed"):
        load_config(None, ["loader.seed=3"])
    with pytest.raises(ConfigError, match="optim.plateau_decay must be in \\(0, 1\\], got 1.5"):
        load_config(None, ["optim.plateau_decay=1.5"])
    with pytest.raises(ConfigError, match="optim.plateau_decay must be in \\(0, 1\\], got 0.0"):
        load_config(None, ["optim.plateau_decay=0"])
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
@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_gpu_dev_mode_trains_with_fused_adam_on_nccl(tiny_data, tmp_path, tower):
    """A fresh process, so the process group is created for CUDA (nccl), not reused from CPU tests. The item
    table (the EBC's, or the transformer's EmbeddingCollection) row-wise, the others table-wise."""
    summary = tmp_path / "summary.json"
    result = subprocess.run([sys.executable, "-m", "trainer", f"data.path={tiny_data}", *TINY_MODEL,
                             *TINY_TOWERS[tower],
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


def learning_rates(job) -> tuple[set[float], set[float], set[float]]:
    """The fused optimizer's and the dense optimizer's configured rates, and the rates the embedding kernels
    themselves hold (what the update in the backward uses)."""
    def leaves(optimizer):
        for _, inner in getattr(optimizer, "optimizers", []):
            yield from leaves(inner)
        yield optimizer

    kernels = [o._emb_module for o in leaves(job.model.dmp.fused_optimizer) if hasattr(o, "_emb_module")]
    assert kernels, "the tables train through fused fbgemm kernels"
    def rates(values):  # the kernels hold float32
        return {float(f"{v:.6g}") for v in values}

    return (rates(g["lr"] for g in job.model.dmp.fused_optimizer.param_groups),
            rates(g["lr"] for g in job.model.dense_optimizer.param_groups),
            rates(k.get_learning_rate() for k in kernels))


@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_plateau_decay_halves_both_rates_after_each_epoch_without_a_validation_gain(tiny_data, tower):
    cfg = tiny_config(tiny_data, **{"train.epochs": 6, "train.early_stopping_patience": 3, "optim.plateau_decay": 0.5,
                                    "optim.sparse_lr": 0.08, "optim.dense_lr": 0.004,
                                    "eval.popularity_baseline": "false", **tower_overrides(tower)})
    job = build(cfg, distributed.init("cpu"))
    values, seen = iter([0.10, 0.20, 0.15, 0.18, 0.30, 0.25]), []
    job.train_epoch = lambda state: seen.append(learning_rates(job))
    job.evaluate = lambda split, scorer=None: {"ndcg@10": next(values) if split == "valid" else 0.0,
                                               "users": 666, "skipped": 0}
    summary = job.fit()
    # Epochs 2, 3 and 5 bring no gain: epochs 3, 4 and 5 train at 1/2, 1/4 and 1/4 of the rates.
    scales = [1, 1, 1, 0.5, 0.25, 0.25]
    assert seen == [({0.08 * s}, {0.004 * s}, {0.08 * s}) for s in scales], seen
    assert [h["lr_scale"] for h in summary["history"]] == scales and summary["best_epoch"] == 4


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A table's weights on this rank (a ShardedTensor holds them in its shards)."""
    return tensor.local_shards()[0].tensor.detach() if hasattr(tensor, "local_shards") else tensor.detach()


def test_the_decayed_rate_is_the_one_the_embedding_update_uses(tiny_data):
    """A step at a 1e-6 scale barely moves the tables a step at the full rate moves."""
    moved = []
    for scale in (1.0, 1e-6):
        job = build(tiny_config(tiny_data, **{"optim.sparse": "sgd", "optim.sparse_lr": 0.5}), distributed.init("cpu"))
        job.model.scale_learning_rates(job.cfg.optim, scale)
        before = {k: local(v).clone() for k, v in job.model.dmp.state_dict().items() if "embedding" in k}
        job.model.pipeline.progress(iter(list(job.data.train_loader.epoch(0))[:2]))
        after = job.model.dmp.state_dict()
        moved.append(sum(float((local(after[k]) - v).abs().sum()) for k, v in before.items()))
    assert moved[0] > 0 and moved[1] < 1e-4 * moved[0], moved


def test_a_resume_restores_the_decayed_rates(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, **{"optim.plateau_decay": 0.5, "checkpoint.dir": str(tmp_path / "ckpt")})
    first = build(cfg, distributed.init("cpu"))
    first.model.dense_optimizer.init_state()  # as after training: Adam has its state
    first.checkpoints.save(first.model.stateful(), LoopState(epoch=3, lr_scale=0.25))
    resumed = build(cfg, distributed.init("cpu"))
    state = resumed.start(tmp_path / "ckpt" / "step-000000000")
    assert state.lr_scale == 0.25
    assert learning_rates(resumed) == ({0.05 * 0.25}, {0.001 * 0.25}, {0.05 * 0.25})


def test_a_checkpoint_from_before_the_decay_resumes_at_full_rates():
    old = {k: v for k, v in LoopState(epoch=2, step=40).to_dict().items() if k != "lr_scale"}
    assert LoopState.from_dict(old).lr_scale == 1.0
    with pytest.raises(ValueError, match="lacks \\['step'\\]"):
        LoopState.from_dict({k: v for k, v in old.items() if k != "step"})


def test_invalid_yaml_config_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    from trainer.__main__ import main as trainer_main

    config = tmp_path / "bad.yaml"
    config.write_text("loader:\n  batch_size: 64\n  history_bags: [1, 2\nmodel: {}\n")
    assert trainer_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {config}: line ") and "column" in err and "invalid YAML" in err
    assert len(err.splitlines()) == 1
    assert trainer_main(["--config", str(config.with_name("nope.yaml"))]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert trainer_main(["loader.history_bags=[1,"]) == 2
    assert "override 'loader.history_bags=[1,'" in capsys.readouterr().err


def test_a_missing_gpu_is_a_one_line_error(capsys):
    from trainer.__main__ import main as trainer_main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert trainer_main(["train.device=cuda", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: train.device=cuda but no GPU is visible; use train.device=cpu or auto"


@pytest.mark.parametrize("old,kind,count,alpha", [
    ({"loader": {"num_negatives": 1024, "sampler": "unigram", "unigram_alpha": 0.5}, "loss": {"in_batch": True}},
     "mixed", 1024, 0.5),
    ({"loader": {"num_negatives": 4096, "sampler": "uniform"}, "loss": {"in_batch": True}}, "mixed", 4096, 0.0),
    ({"loader": {"num_negatives": 0}, "loss": {"in_batch": True}}, "in_batch", 1024, 0.75),
    ({"loader": {"num_negatives": 64, "sampler": "uniform"}, "loss": {"in_batch": False}}, "uniform", 64, 0.75),
    ({"loader": {"num_negatives": 64, "sampler": "unigram", "unigram_alpha": 1.0}, "loss": {"in_batch": False}},
     "frequency", 64, 1.0),
])
def test_a_config_saved_before_the_negatives_section_resumes_with_the_same_negatives(old, kind, count, alpha):
    """A checkpoint's config.yaml from before `negatives:` is read in today's keys (the same draws); a config
    file with the old keys is an error naming the new ones."""
    text = yaml.safe_dump({**old, "loader": {**old["loader"], "batch_size": 32}})
    cfg = load_config_text(text, "step-000000010/config.yaml", saved=True)
    assert (cfg.negatives.kind, cfg.negatives.num_sampled, cfg.negatives.alpha) == (kind, count, alpha)
    assert cfg.loader.batch_size == 32
    with pytest.raises(ConfigError, match="is now negatives"):
        load_config_text(text, "configs/old.yaml")


@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_each_tower_trains_against_the_whole_catalogue(tiny_data, tower):
    """negatives.kind=catalogue end to end: every item is a candidate of every batch, and the loss falls."""
    cfg = tiny_config(tiny_data, **tower_overrides(tower), **{"negatives.kind": "catalogue"})
    job = build(cfg, distributed.init("cpu"))
    iterator = iter(job.data.train_loader.epoch(0))
    batch = next(iter(job.data.train_loader.epoch(0)))
    items = set(range(1, job.data.meta.num_items + 1))
    assert items <= set(batch.candidate_ids.tolist()), "every item is a candidate"
    losses = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in range(8)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def featureless_data(tmp_path_factory):
    """A bare sequence file (`user item item ...`, no attributes): what most users bring. 300 users walk a ring of
    60 items, so the next item is learnable."""
    from data.prepare.cli import main as prepare_main

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("featureless")
    lines = []
    for user in range(300):
        start, n = int(rng.integers(60)), int(rng.integers(5, 15))
        lines.append(" ".join([str(user)] + [str((start + 2 * t) % 60 + 1) for t in range(n)]))
    (root / "seq.txt").write_text("\n".join(lines) + "\n")
    assert prepare_main(["sequences", str(root / "seq.txt"), "--out", str(root / "prepared")]) == 0
    return root / "prepared"


@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_a_sequence_file_without_features_trains(featureless_data, tower):
    """No user, context or item features: the feature KJT has no keys (it used to fail building the batch)."""
    meta = Metadata.load(featureless_data)
    assert not (meta.user_features or meta.context_features or meta.item_features)
    cfg = tiny_config(featureless_data, **tower_overrides(tower), **{"train.epochs": 2})
    result = train(cfg)
    assert result["test"]["hr@10"] > 2 * result["popularity_test"]["hr@10"], result["test"]


def test_the_short_history_recipe_trains_tied_with_input_norm(featureless_data):
    """model.tower.candidate=tied scores against the item table itself, and model.tower.input_norm adds the
    LayerNorm: both reach the model, train, and learn the ring."""
    cfg = tiny_config(featureless_data, **tower_overrides("transformer"),
                      **{"model.tower.candidate": "tied", "model.tower.input_norm": "true", "model.hidden_dims": "[]",
                         "model.output_dim": "16", "negatives.kind": "catalogue", "train.epochs": 3})
    job = build(cfg, distributed.init("cpu"))
    head = job.model.towers.head
    assert head.candidate_mlp is None and head.feature_projection is None and head.tied
    assert isinstance(head.input_norm, torch.nn.LayerNorm)
    result = train(cfg)
    assert result["test"]["hr@10"] > 2 * result["popularity_test"]["hr@10"], result["test"]
    with pytest.raises(ConfigError, match="must equal model.item_dim"):
        build(tiny_config(featureless_data, **tower_overrides("transformer"),
                          **{"model.tower.candidate": "tied", "model.output_dim": "8"}), distributed.init("cpu"))
