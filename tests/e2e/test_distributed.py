"""Cross-rank behaviour with real processes on gloo: the gradient of the all-gather, 2 processes
training exactly like 1 process on the concatenated batch (both towers), every CPU sharding type, and
exporting what they wrote."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from config import dump, load_config
from data.batch import TrainBatch, make_kjt
from data.keys import SEQUENCE_KEY
from data.loader import SEQUENCE, open_loader
from serving.model import ExportedModel
from sharding.plan import UNPOOLED_SHARDING_TYPES
from tests.conftest import recommend_from_raw_ids, synthetic_dataset
from towers.shared import kjt_features
from trainer.collectives import all_gather_with_grad
from trainer.distributed import free_port
from trainer.export.artifact import export

B, S, STEPS = 32, 16, 3


def gather_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(world, 3, 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(world, world * 3, 4, generator=gen, dtype=torch.float64)
    x = xs[rank].clone().requires_grad_()
    gathered = all_gather_with_grad(x)
    (weights[rank] * gathered).sum().backward()
    torch.save({"gathered": gathered.detach(), "grad": x.grad}, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def test_all_gather_backward_is_a_reduce_scatter(tmp_path):
    mp.spawn(gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(result["gathered"], torch.cat([xs[0], xs[1]]))
        expected = weights[0, rank * 3:(rank + 1) * 3] + weights[1, rank * 3:(rank + 1) * 3]
        torch.testing.assert_close(result["grad"], expected)


def select_rows(batch: TrainBatch, rows: np.ndarray) -> TrainBatch:
    """The sub-batch of some rows of a TrainBatch (queries, then the same negatives)."""
    arrays = []
    for key in batch.sparse.keys():
        jt = batch.sparse[key]
        offsets, values = jt.offsets().numpy(), jt.values().numpy()
        lengths = offsets[rows + 1] - offsets[rows]
        picked = np.concatenate([values[offsets[r]:offsets[r + 1]] for r in rows]) if lengths.sum() else values[:0]
        arrays.append((lengths, picked))
    rows_t = torch.from_numpy(rows)
    n = len(batch.row_mask)
    return TrainBatch(make_kjt(batch.sparse.keys(), arrays), batch.candidate_ids[rows_t],
                      batch.row_mask[rows_t[rows_t < n]])


def deterministic_tables(dmp) -> None:
    """Same embedding values however the tables are sharded (DMP's own init depends on placement)."""
    for key, value in dmp.state_dict().items():
        if "embedding_bags" not in key and ".embeddings." not in key:
            continue
        rows, dim = value.size()
        full = torch.randn(rows, dim, generator=torch.Generator().manual_seed(zlib.crc32(key.encode()))) * 0.1
        for shard in value.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(full[r0:r0 + nr, c0:c0 + nc])


def parity_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from config import load_config
    from trainer import distributed
    from trainer.loop import build

    cfg = load_config(None, [f"data.path={data}", f"loader.batch_size={B * 2 // world}", f"negatives.num_sampled={S}",
                             "model.hidden_dims=[32]", "model.output_dim=16", "model.item_dim=16",
                             "model.feature_dim=8", "tracking.enabled=false", "loss.temperature=0.2",
                             # SGD on both sides: unlike Adagrad and Adam its update is proportional to
                             # the gradient, so a wrongly scaled gradient shows up in the parameters.
                             "optim.sparse=sgd", "optim.sparse_lr=0.5", "optim.dense=sgd", "optim.dense_lr=0.5"])
    env = distributed.init("cpu")
    job = build(cfg, env)
    deterministic_tables(job.model.dmp)
    global_cfg = load_config(None, [f"data.path={data}", f"loader.batch_size={2 * B}", f"negatives.num_sampled={S}"])
    source = open_loader(data, global_cfg.loader)
    epoch = list(source.epoch(0))
    batches = []
    for batch in epoch[:STEPS - 1] + epoch[-1:]:  # the last one is padded, so the ranks' real rows differ
        mine = np.r_[np.arange(rank * 2 * B // world, (rank + 1) * 2 * B // world), np.arange(2 * B, 2 * B + S)]
        batches.append(select_rows(batch, mine))
    iterator = iter(batches)
    losses = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in range(STEPS)]
    tables = {}
    for key, value in job.model.dmp.state_dict().items():
        if "embedding_bags" in key:
            tables[key] = [(shard.metadata.shard_offsets, shard.tensor.clone()) for shard in value.local_shards()]
        elif "mlp" in key:
            tables[key] = [((0, 0), value.clone())]
    torch.save({"losses": losses, "params": tables}, Path(out) / f"{world}-{rank}.pt")
    distributed.shutdown()


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory, "parity", 410, 150, 12, 8, 10)  # 1,521 examples: 49 in the last 64


@pytest.mark.slow
def test_two_processes_train_like_one_on_the_concatenated_batch(parity_data, tmp_path):
    """Including a padded last batch that leaves rank 1 fewer real rows than rank 0: every row still weighs
    the same as in one process."""
    last = list(open_loader(parity_data, load_config(None, [f"loader.batch_size={2 * B}"]).loader).epoch(0))[-1]
    assert B < int(last.row_mask.sum()) < 2 * B, "rank 0 gets B real rows, rank 1 fewer"
    for world in (1, 2):
        mp.spawn(parity_worker, args=(world, free_port(), str(parity_data), str(tmp_path)), nprocs=world)
    single = torch.load(tmp_path / "1-0.pt")
    ranks = [torch.load(tmp_path / f"2-{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.tensor(single["losses"]),
                               (torch.tensor(ranks[0]["losses"]) + torch.tensor(ranks[1]["losses"])) / 2,
                               rtol=1e-4, atol=1e-5)
    for key, [(_, expected)] in single["params"].items():
        if "mlp" in key:
            for rank in ranks:
                torch.testing.assert_close(rank["params"][key][0][1], expected, rtol=1e-4, atol=1e-6, msg=key)
            continue
        for rank in ranks:
            for (r0, c0), shard in rank["params"].get(key, []):
                torch.testing.assert_close(shard, expected[r0:r0 + shard.shape[0], c0:c0 + shard.shape[1]],
                                           rtol=1e-4, atol=1e-6, msg=key)


SEQUENCE_OVERRIDES = ["model.query_tower=transformer", "loader.max_sequence_length=6", "loader.feature_dropout=0",
                      "model.tower.dropout=0", "model.tower.blocks=1", "model.tower.heads=2",
                      "loader.history_bags=[1, 0]",
                      f"negatives.num_sampled={S}", "model.hidden_dims=[32]", "model.output_dim=16",
                      "model.item_dim=16", "model.feature_dim=8", "tracking.enabled=false", "loss.temperature=0.2",
                      "optim.sparse=sgd", "optim.sparse_lr=0.5", "optim.dense=sgd", "optim.dense_lr=0.5",
                      "train.collective_timeout_s=60", "loss.mask_seen=true"]


def sequence_parity_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    """The transformer tower: each rank trains on its half of the sequence rows of one process's batches, with
    the same mixed negatives (built by one loader, as rank 0 of a world of one would)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from trainer import distributed
    from trainer.loop import build

    rows = 2 * B // world
    job = build(load_config(None, [f"data.path={data}", f"loader.batch_size={rows}"] + SEQUENCE_OVERRIDES),
                distributed.init("cpu"))
    deterministic_tables(job.model.dmp)
    source = open_loader(data, load_config(None, [f"loader.batch_size={2 * B}"] + SEQUENCE_OVERRIDES).loader,
                         layout=SEQUENCE)
    pairs = list(source.index_batches(0))
    batches = [source.make_batch(block, idx[rank * rows:(rank + 1) * rows], 0, index)
               for index, (block, idx) in list(enumerate(pairs))[:STEPS - 1] + [(len(pairs) - 1, pairs[-1])]]
    iterator = iter(batches)
    losses = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in range(STEPS)]
    params = {}
    for key, value in job.model.dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            params[key] = [(shard.metadata.shard_offsets, shard.tensor.clone()) for shard in value.local_shards()]
        elif "head." in key:
            params[key] = [((0, 0), value.clone())]
    torch.save({"losses": losses, "params": params, "positions": [int(b.positions.numel()) for b in batches]},
               Path(out) / f"seq-{world}-{rank}.pt")
    distributed.shutdown()


@pytest.mark.slow
def test_two_processes_train_the_transformer_like_one_on_the_concatenated_batch(parity_data, tmp_path):
    """Losses and SGD updates of the item table, the feature tables and every dense weight, across a padded last
    batch; the ranks' distinct targets overlap, and the loss keeps each once, as one process does; each rank masks
    what its positions have read (`loss.mask_seen`) as one process does."""
    for world in (1, 2):
        mp.spawn(sequence_parity_worker, args=(world, free_port(), str(parity_data), str(tmp_path)), nprocs=world)
    single = torch.load(tmp_path / "seq-1-0.pt")
    ranks = [torch.load(tmp_path / f"seq-2-{r}.pt") for r in range(2)]
    assert ranks[0]["positions"][-1] != ranks[1]["positions"][-1], "the last batch gives the ranks unequal positions"
    torch.testing.assert_close(torch.tensor(single["losses"]),
                               (torch.tensor(ranks[0]["losses"]) + torch.tensor(ranks[1]["losses"])) / 2,
                               rtol=1e-4, atol=1e-5)
    assert any("head." in key for key in single["params"]) and any(".embeddings." in k for k in single["params"])
    for key, [(_, expected)] in single["params"].items():
        for rank in ranks:
            for (r0, c0), shard in rank["params"].get(key, []):
                if "head." in key:
                    torch.testing.assert_close(shard, expected, rtol=1e-4, atol=1e-5, msg=key)
                    continue
                torch.testing.assert_close(shard, expected[r0:r0 + shard.shape[0], c0:c0 + shard.shape[1]],
                                           rtol=1e-4, atol=1e-5, msg=key)


def sharding_worker(rank: int, world: int, port: int, data: str, cases: list[tuple[str, str]], out: str) -> None:
    """Trains every (tower, sharding type) case in turn in one process group: one spawn, and one start-up of
    TorchRec per rank, for all of them."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from trainer import distributed

    for tower, sharding_type in cases:
        train_one_sharding(rank, data, tower, sharding_type, out)
    distributed.shutdown()


def train_one_sharding(rank: int, data: str, tower: str, sharding_type: str, out: str) -> None:
    from trainer import distributed
    from trainer.checkpointing import checkpoint
    from trainer.loop import build

    # The transformer: the EmbeddingCollection's item table gets the type, the EBC's feature tables table_wise.
    types = [f"sharding.sharding_types=[{sharding_type}]"] if tower == "bags" else \
        [f"model.query_tower={tower}", "loader.max_sequence_length=6", "sharding.sharding_types=[table_wise]",
         f"sharding.per_table={{item_ids: [{sharding_type}]}}"]
    cfg = load_config(None, [f"data.path={data}", "loader.batch_size=32", "negatives.num_sampled=16",
                             "model.hidden_dims=[32]", "model.output_dim=16", "model.item_dim=16",
                             "model.feature_dim=8", "tracking.enabled=false", *types])
    job = build(cfg, distributed.init("cpu"))

    def tables():
        """This rank's copy of every table it holds: a local shard, or a replica (data-parallel)."""
        out = {}
        for key, value in job.model.dmp.state_dict().items():
            if "embedding_bags" not in key and ".embeddings." not in key:
                continue
            if not hasattr(value, "local_shards"):
                out[key] = value.detach().clone()
            elif value.local_shards():
                out[key] = value.local_shards()[0].tensor.clone()
        return out

    before = tables()
    iterator = iter(job.data.train_loader.epoch(0))
    losses = [float(job.model.pipeline.progress(iterator)["loss"]) for _ in range(4)]
    after = tables()
    plan = json.loads(job.model.plan_json)
    changed = {k: bool((before[k] - after[k]).abs().max() > 0) for k in before}
    # The sharded model's scores on this rank's first validation batch, and its weights for export.
    checkpoint.save_model(job.model.dmp, Path(out) / f"{tower}-{sharding_type}-model", {"epoch": 0, "step": 4},
                          dump(cfg))
    job.model.pipeline.detach()
    job.model.dmp.eval()
    batch = next(iter(job.data.eval_loaders["valid"].epoch(0)))
    scores = job.model.scorer(job.data, torch.device("cpu"))(batch)
    history = batch.sequence[SEQUENCE_KEY] if tower == "transformer" else None
    torch.save({"losses": losses, "types": {k: v["sharding_type"] for k, v in plan.items()}, "changed": changed,
                "scores": scores, "features": kjt_features(batch.sparse), "users": batch.users,
                "sequence": None if history is None else (history.lengths().long(), history.values())},
               Path(out) / f"{tower}-{sharding_type}-{rank}.pt")


def check_export_scores_like_the_sharded_model(out: Path, data: Path, tower: str, sharding_type: str) -> None:
    """Export reassembles the shards of both ranks into one unsharded model that scores like the sharded one."""
    export(out / f"{tower}-{sharding_type}-model", out / f"{tower}-{sharding_type}-export")
    model = ExportedModel(out / f"{tower}-{sharding_type}-export")
    assert model.manifest.query_tower.kind == tower
    for rank in range(2):
        result = torch.load(out / f"{tower}-{sharding_type}-{rank}.pt")
        with torch.no_grad():
            if result["sequence"] is not None:
                query = model.tower.query(*result["sequence"], result["features"]).numpy()
            else:
                query = model.tower.query(result["features"]).numpy()
        torch.testing.assert_close(torch.from_numpy(query @ model.embeddings.T),
                                   result["scores"][:, torch.from_numpy(model.item_ids)], rtol=1e-5, atol=1e-5)
        # The same queries from raw ids, as `recommend --history` builds them (a sequence tower's batch holds them
        # by length, the bag tower's in file order: looked up by user).
        by_user = {row["user"]: row for row in pq.read_table(data / "valid").to_pylist()}
        for position, user in enumerate(result["users"][:10].tolist()):
            row = by_user[user]
            items, scores = recommend_from_raw_ids(model, row)
            torch.testing.assert_close(torch.tensor(scores), result["scores"][position, items], rtol=1e-5, atol=1e-5)


BAG_SHARDING_TYPES = ["table_wise", "column_wise", "table_column_wise", "data_parallel"]
# Every type TorchRec shards an EmbeddingCollection with on CPU (table_wise: the parity test above;
# sharding.plan refuses data_parallel and table_column_wise for it, naming these).
COLLECTION_SHARDING_TYPES = [t for t in UNPOOLED_SHARDING_TYPES if t != "table_wise"]


@pytest.fixture(scope="module")
def sharded_runs(parity_data, tmp_path_factory) -> Path:
    """Both ranks' results for every CPU sharding case, from one 2-process spawn."""
    out = tmp_path_factory.mktemp("sharded")
    cases = [("bags", t) for t in BAG_SHARDING_TYPES] + [("transformer", t) for t in COLLECTION_SHARDING_TYPES]
    mp.spawn(sharding_worker, args=(2, free_port(), str(parity_data), cases, str(out)), nprocs=2)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", BAG_SHARDING_TYPES)
def test_each_cpu_sharding_type_trains_on_two_processes(parity_data, sharded_runs, sharding_type):
    for rank in range(2):
        result = torch.load(sharded_runs / f"bags-{sharding_type}-{rank}.pt")
        assert set(result["types"].values()) == {sharding_type}, result["types"]
        assert all(np.isfinite(result["losses"]))
        assert result["changed"] and all(result["changed"].values()), ("every local table shard was updated",
                                                                       result["changed"])
    check_export_scores_like_the_sharded_model(sharded_runs, parity_data, "bags", sharding_type)


@pytest.mark.slow
@pytest.mark.parametrize("sharding_type", COLLECTION_SHARDING_TYPES)
def test_each_cpu_sharding_type_of_the_item_collection_trains_the_transformer(parity_data, sharded_runs,
                                                                              sharding_type):
    for rank in range(2):
        result = torch.load(sharded_runs / f"transformer-{sharding_type}-{rank}.pt")
        assert result["types"].pop("towers.ec.item_ids") == sharding_type
        assert set(result["types"].values()) == {"table_wise"}, result["types"]
        assert all(np.isfinite(result["losses"]))
        assert result["changed"] and all(result["changed"].values()), ("every local table shard was updated",
                                                                       result["changed"])
    check_export_scores_like_the_sharded_model(sharded_runs, parity_data, "transformer", sharding_type)
