"""The transformer query tower: causal attention against a reference, the config fields it reads, the
pipeline equal to the plain loop with both collections pipelined, and a short synthetic training run."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import towers
from config import ConfigError, load_config
from data.batch import make_kjt
from data.keys import ITEM_KEY, SEQUENCE_KEY
from data.schema import Metadata
from serving.layers import CausalBlock, Dropout, causal_attention
from serving.sequence import Grid, SequenceHead, SequenceShape, causal_bags
from tests.conftest import TINY_TOWERS, tiny_config, tower_overrides
from tests.trainer.test_train import pipelined_and_plain_losses
from trainer import distributed
from trainer.evaluate import evaluate
from trainer.loop import build, train

TRANSFORMER = {"model.query_tower": "transformer", "loader.batch_size": 32, "loader.max_sequence_length": 12}


def reference_block(block: CausalBlock, x: torch.Tensor) -> torch.Tensor:
    """The pre-norm block written out head by head, position by position (eval mode: no dropout)."""
    b, n, d = x.shape
    heads = block.heads
    h = d // heads
    qkv = block.qkv(block.attention_norm(x))
    out = torch.zeros_like(x)
    for row in range(b):
        for t in range(n):
            parts = []
            for head in range(heads):
                q = qkv[row, t, head * h:(head + 1) * h]
                keys = qkv[row, :t + 1, d + head * h:d + (head + 1) * h]
                values = qkv[row, :t + 1, 2 * d + head * h:2 * d + (head + 1) * h]
                weights = torch.softmax(keys @ q / math.sqrt(h), dim=0)
                parts.append(weights @ values)
            out[row, t] = torch.cat(parts)
    x = x + block.out(out)
    return x + block.ff(block.ff_norm(x))


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_causal_block_equals_the_head_by_head_reference(heads):
    torch.manual_seed(0)
    block = CausalBlock(8, heads, 0.3, torch.device("cpu")).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), reference_block(block, x), rtol=1e-10, atol=1e-12)


def test_the_cpu_attention_with_dropout_is_scaled_dot_product_attention(monkeypatch):
    """On the CPU, training with dropout forms the attention weights itself (bernoulli_ is slow there). With
    every weight kept, that is torch's attention times 1 / (1 - p); with random masks, outputs differ."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    dropout = Dropout(0.5).train()
    torch.testing.assert_close(causal_attention(q, k, v, dropout.eval()), want)
    dropout.train()
    first, second = causal_attention(q, k, v, dropout), causal_attention(q, k, v, dropout)
    assert not torch.allclose(first, second)
    every_bit_kept = 0x7FFF7FFF7FFF7FFF  # four int16 draws of 32767: above any threshold
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: torch.full(args[2], every_bit_kept,
                                                                              dtype=torch.int64))
    torch.testing.assert_close(causal_attention(q, k, v, dropout), 2 * want)


def test_a_position_never_sees_the_future_nor_other_rows():
    torch.manual_seed(0)
    cfg = SequenceShape(item_dim=8, blocks=2, heads=2, dropout=0.2, hidden_dims=[8], output_dim=4)
    head = SequenceHead(cfg, 6, 0, 0, torch.device("cpu")).double().eval()
    lengths = torch.tensor([5, 2, 6])
    history = torch.randn(int(lengths.sum()), 8, dtype=torch.float64)
    positions = torch.arange(3 * 6)  # every (row, step) of the padded layout
    base = head.encode(history, lengths, positions).view(3, 6, -1)
    changed = history.clone()
    changed[3] = torch.randn(8, dtype=torch.float64)  # row 0, step 3
    after = head.encode(changed, lengths, positions).view(3, 6, -1)
    torch.testing.assert_close(after[0, :3], base[0, :3])
    assert not torch.allclose(after[0, 3:5], base[0, 3:5])
    torch.testing.assert_close(after[1:], base[1:])
    alone = head.encode(history[5:7], lengths[1:2], torch.arange(2))
    torch.testing.assert_close(alone, base[1, :2], msg="a row's encoding does not depend on the batch's width")


def test_causal_bags_are_the_bag_towers_last_k_means_at_every_position():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 2, 7])
    history = torch.randn(int(lengths.sum()), 3, generator=gen, dtype=torch.float64)
    x = Grid.of(lengths).place(history)
    bags = causal_bags(x, [1, 3, 0])
    offsets = [0, 5, 7]
    for row, n in enumerate(lengths.tolist()):
        items = history[offsets[row]:offsets[row] + n]
        for t in range(n):
            for k, got in zip([1, 3, 0], bags):
                window = items[: t + 1] if k == 0 else items[max(0, t + 1 - k): t + 1]
                torch.testing.assert_close(got[row, t], window.mean(0), rtol=1e-12, atol=1e-12)


def test_history_bags_widen_the_query_input_and_may_be_left_out():
    cfg = SequenceShape(item_dim=8, blocks=2, heads=1, dropout=0.2, hidden_dims=[], output_dim=4)
    assert SequenceHead(cfg, 6, 5, 0, torch.device("cpu"), (1, 10, 0)).query_mlp[0].in_features == 8 * 4 + 5
    assert SequenceHead(cfg, 6, 5, 0, torch.device("cpu"), ()).query_mlp[0].in_features == 8 + 5
    cfg = towers.resolve(load_config(None, ["model.query_tower=transformer", "loader.history_bags=[]"]))
    assert cfg.loader.history_bags == []
    with pytest.raises(ConfigError, match="the bags tower's query needs at least one history bag"):
        towers.resolve(load_config(None, ["loader.history_bags=[]"]))


def test_the_grid_places_jagged_rows_left_aligned_or_packed():
    values = torch.arange(6, dtype=torch.float32)[:, None]
    lengths = torch.tensor([2, 0, 4])
    out = Grid.of(lengths).place(values)
    assert out.squeeze(2).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0], [2, 3, 4, 5]]
    packed = Grid.of(lengths, torch.tensor([[1, 0], [0, 0], [0, 0]])).place(values, fill=-1)
    assert packed.squeeze(2).tolist() == [[2, 3, 4, 5], [0, 1, -1, -1]]


def test_blocks_heads_and_dropout_are_read():
    cfg = SequenceShape(item_dim=8, blocks=3, heads=2, dropout=0.5, hidden_dims=[], output_dim=4)
    head = SequenceHead(cfg, 6, 0, 0, torch.device("cpu"))
    assert len(head.blocks) == 3 and all(b.heads == 2 and b.dropout == 0.5 for b in head.blocks)
    x = torch.ones(1000)
    dropped = Dropout(0.5).train()(x)
    assert set(dropped.unique().tolist()) == {0.0, 2.0} and abs(float((dropped == 0).float().mean()) - 0.5) < 0.05
    assert torch.equal(Dropout(0.5).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_dropout_drops_each_element_alone_at_its_rate_and_keeps_the_mean(p):
    """Four elements share one 64-bit draw: each must still be dropped at rate p (within 4.5 standard errors),
    independently of its neighbours in the same draw (the correlation of elements 1, 2 and 4 apart is
    about 0), and the output's mean must stay the input's."""
    torch.manual_seed(0)
    n = 1 << 20
    out = Dropout(p).train()(torch.ones(n))
    kept = (out > 0).double()
    assert abs(float(kept.mean()) - (1 - p)) < 4.5 * (p * (1 - p) / n) ** 0.5
    assert abs(float(out.double().mean()) - 1) < 4.5 * (p / (1 - p) / n) ** 0.5
    for lag in (1, 2, 4):
        assert abs(float(torch.corrcoef(torch.stack([kept[:-lag], kept[lag:]]))[0, 1])) < 0.01, lag
    transformer = ["model.query_tower=transformer"]
    resolved = towers.resolve(load_config(None, transformer + ["model.tower.blocks=3", "model.tower.heads=2",
                                                               "model.tower.dropout=0.5", "model.tower.input_norm=true",
                                                               "model.tower.candidate=tied"]))
    assert dataclasses.astuple(resolved.model.tower) == (3, 2, 0.5, True, "tied"), \
        "the file's values reach the typed section"
    with pytest.raises(ConfigError, match=r"model.tower.candidate must be one of \('mlp', 'tied'\), got 'dot'"):
        towers.resolve(load_config(None, transformer + ["model.tower.candidate=dot"]))
    with pytest.raises(ConfigError, match=r"model.item_dim \(12\) must be divisible by model.tower.heads \(5\)"):
        towers.resolve(load_config(None, transformer + ["model.item_dim=12", "model.tower.heads=5"]))
    with pytest.raises(ConfigError, match=r"unknown tower 'lstm' \(registered: bags, transformer, hstu\)"):
        towers.resolve(load_config(None, ["model.query_tower=lstm"]))
    with pytest.raises(ConfigError, match=r"unknown key model.tower.share_item_table \(allowed in model.tower: "
                                          r"blocks, candidate, dropout, heads, input_norm\)"):
        towers.resolve(load_config(None, transformer + ["model.tower.share_item_table=false"]))
    with pytest.raises(ConfigError, match=r"model.tower.dropout must be in \[0, 1\)"):
        towers.resolve(load_config(None, transformer + ["model.tower.dropout=1.5"]))
    with pytest.raises(ConfigError, match=r"model.tower.blocks: expected int, got 'x'"):
        towers.resolve(load_config(None, transformer + ["model.tower.blocks=x"]))
    with pytest.raises(ConfigError, match=r"model.tower must be a mapping .* got 5"):
        load_config(None, ["model.tower=5"])


def test_the_transformer_pipeline_equals_the_plain_loop_with_both_collections_pipelined(tiny_data):
    cfg = tiny_config(tiny_data, **TRANSFORMER, **{"model.tower.dropout": 0.0, "loss.max_logits": 500})
    assert build(cfg, distributed.init("cpu")).model.dmp.module.loss_fn.max_logits == 500, "the config reaches it"
    pipelined, plain, modules = pipelined_and_plain_losses(cfg, 5)
    assert modules == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingCollection"]
    assert plain[0] != plain[-1]
    torch.testing.assert_close(torch.tensor(pipelined), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_the_item_table_is_one_collection_shared_by_history_and_candidates(tiny_data):
    job = build(tiny_config(tiny_data, **TRANSFORMER), distributed.init("cpu"))
    towers = job.model.towers
    assert [(t.name, t.feature_names) for t in towers.sequence_tables] == [("item_ids", [SEQUENCE_KEY, ITEM_KEY])]
    assert all("item" not in t.name for t in towers.tables), "no second item table in the EBC"
    meta = Metadata.load(tiny_data)
    items = towers.item_embeddings(job.data.train_loader.catalogue, torch.device("cpu"))
    assert items.shape == (meta.num_items + 1, 16)
    torch.testing.assert_close(items.norm(dim=1), torch.ones(meta.num_items + 1))


@pytest.mark.slow
@pytest.mark.parametrize("tower", ["transformer", "hstu"])
def test_sequence_training_beats_popularity_and_is_reproducible(tiny_data, tower):
    cfg = tiny_config(tiny_data, **(TRANSFORMER | {"model.query_tower": tower, "train.epochs": 3,
                                                   "train.early_stopping_metric": "hr@50", "optim.dense_lr": 0.005}))
    first = train(cfg)
    assert first["test"]["hr@50"] > 1.5 * first["popularity_test"]["hr@50"], (first["test"], first["popularity_test"])
    assert first["test"]["users"] == Metadata.load(tiny_data).counts["test_rows"]
    second = train(cfg)
    assert second["test"] == first["test"], "same config and data give the same metrics"


def test_queries_and_candidates_are_unit_vectors_scored_by_dot_product(tiny_data):
    job = build(tiny_config(tiny_data, **TRANSFORMER), distributed.init("cpu"))
    batch = next(iter(job.data.eval_loaders["valid"].epoch(0)))
    job.model.dmp.eval()
    with torch.no_grad():
        query = job.model.towers.query_embeddings(batch, torch.device("cpu"))
        scores = job.model.scorer(job.data, torch.device("cpu"))(batch)
    items = job.model.towers.item_embeddings(job.data.train_loader.catalogue, torch.device("cpu"))
    torch.testing.assert_close(query.norm(dim=1), torch.ones(len(query)))
    torch.testing.assert_close(scores, F.normalize(query, dim=1) @ items.T)


def without_query_features(batch, layout_features: list[tuple[str, bool]]):
    """The batch as serving sends it when no user or context feature is known: the padding id for a scalar
    feature, an empty list for a list feature."""
    sparse = batch.sparse
    arrays = []
    for key in sparse.keys():
        lengths, values = sparse[key].lengths().numpy(), sparse[key].values().numpy()
        multi = dict(layout_features).get(key)
        if multi is True:
            lengths, values = np.zeros_like(lengths), values[:0]
        elif multi is False:
            values = np.zeros_like(values)
        arrays.append((lengths, values))
    return dataclasses.replace(batch, sparse=make_kjt(sparse.keys(), arrays))


def padding_rows(dmp, tables: list[str]) -> dict[str, torch.Tensor]:
    state = dmp.state_dict()
    out = {}
    for key, value in state.items():
        table = next((t for t in tables if f".{t}." in key), None)
        if table is not None and key.endswith("weight"):
            shard = value.local_shards()[0].tensor if hasattr(value, "local_shards") else value
            out[table] = shard[0].clone()
    assert set(out) == set(tables), (sorted(out), tables)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_a_query_without_its_features_maps_to_trained_embeddings(tiny_data, tower):
    """Feature dropout trains the padding row of every user and context feature table: a query that
    has none of them ranks far better than random on validation. Without it those rows are never
    trained (they keep their random initial values)."""
    overrides = {**(TRANSFORMER if tower == "transformer" else tower_overrides(tower)), "train.epochs": 2,
                 "eval.popularity_baseline": "false", "optim.dense_lr": 0.005}
    meta = Metadata.load(tiny_data)
    features = [(f.name, f.multi) for f in meta.user_features + meta.context_features]
    tables = [f"{name}_table" for name, _ in features]
    moved = {}
    for rate in (0.3, 0.0):
        job = build(tiny_config(tiny_data, **overrides, **{"loader.feature_dropout": rate}), distributed.init("cpu"))
        before = padding_rows(job.model.dmp, tables)
        job.fit()
        after = padding_rows(job.model.dmp, tables)
        moved[rate] = {t: not torch.equal(before[t], after[t]) for t in tables}
        if rate > 0:
            scorer = job.model.scorer(job.data, torch.device("cpu"))
            job.model.dmp.eval()
            metrics = evaluate(lambda b, score=scorer: score(without_query_features(b, features)),
                               job.data.eval_loaders["valid"].epoch(0), [50], meta.num_items, torch.device("cpu"))
            assert metrics["hr@50"] > 2 * 50 / meta.num_items, metrics
    assert all(moved[0.3].values()), moved
    assert not any(moved[0.0].values()), "without dropout the padding rows are never looked up in training"


@pytest.mark.parametrize("tower", sorted(TINY_TOWERS))
def test_merged_candidate_columns_train_like_one_column_per_copy(tiny_data, tower):
    """loss.merge_duplicates (and the candidate MLP run once per distinct item) changes how much is computed,
    not the training: the same losses, step after step, as one logit column per candidate copy."""
    overrides = {**TRANSFORMER, "model.tower.dropout": 0.0} if tower == "transformer" else tower_overrides(tower)
    losses = {}
    for merge in ("true", "false"):
        job = build(tiny_config(tiny_data, **overrides, **{"loss.merge_duplicates": merge}), distributed.init("cpu"))
        assert job.model.dmp.module.loss_fn.merge is (merge == "true"), "the config reaches the loss"
        batches = list(job.data.train_loader.epoch(0))[:6]
        ids = batches[0].candidate_ids
        assert len(torch.unique(ids)) < len(ids), "the batch repeats candidates, so merging has work to do"
        iterator = iter(batches)
        losses[merge] = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in batches]
    assert losses["true"][0] != losses["true"][-1], "training moved the parameters"
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), rtol=1e-5, atol=1e-6)


def test_mask_seen_reaches_the_loss_and_lowers_the_first_step(tiny_data):
    """loss.mask_seen is read: the transformer's loss masks what each position has read, so from the same
    initial parameters and batch its first loss is lower (fewer columns in each denominator). The bags tower
    refuses it by name."""
    losses = {}
    for mask in ("true", "false"):
        job = build(tiny_config(tiny_data, **TRANSFORMER, **{"model.tower.dropout": 0.0, "loss.mask_seen": mask}),
                    distributed.init("cpu"))
        assert job.model.dmp.module.loss_fn.mask_seen is (mask == "true"), "the config reaches the loss"
        iterator = iter(list(job.data.train_loader.epoch(0))[:1])
        losses[mask] = float(job.model.pipeline.progress(iterator)["loss"])
    assert losses["true"] < losses["false"] - 1e-4, losses
    with pytest.raises(ConfigError, match="loss.mask_seen=true needs a tower trained on sequences; the bags tower"):
        towers.resolve(tiny_config(tiny_data, **{"loss.mask_seen": "true"}))


def test_tied_candidates_are_the_item_embeddings_plus_projected_features():
    """candidate=tied: no candidate MLP; a candidate is its normalised item row, and item features enter through a
    projection that starts at zero (so at initialisation the score is against the item table itself)."""
    items, features = torch.randn(5, 8, dtype=torch.float64), [torch.randn(5, 3, dtype=torch.float64)]
    tied = SequenceShape(item_dim=8, blocks=1, heads=1, dropout=0.0, hidden_dims=[], output_dim=8, candidate="tied")
    head = SequenceHead(tied, 6, 0, 3, torch.device("cpu")).double()
    assert head.candidate_mlp is None
    torch.testing.assert_close(head.candidate(items, features), items / items.norm(dim=1, keepdim=True))
    with torch.no_grad():
        head.feature_projection.weight.normal_()
    expected = items + features[0] @ head.feature_projection.weight.T + head.feature_projection.bias
    torch.testing.assert_close(head.candidate(items, features), expected / expected.norm(dim=1, keepdim=True))
    normed = SequenceHead(dataclasses.replace(tied, input_norm=True), 6, 0, 0, torch.device("cpu"))
    plain = SequenceHead(dataclasses.replace(tied, input_norm=False), 6, 0, 0, torch.device("cpu"))
    assert isinstance(normed.input_norm, torch.nn.LayerNorm) and isinstance(plain.input_norm, torch.nn.Identity)
