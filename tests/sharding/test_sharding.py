"""Planner inputs and the fail-fast placement check; planning on paper for a larger cluster."""

from __future__ import annotations

import json

import pytest
import torch

import towers
from config import ConfigError, JobConfig, ShardingConfig, load_config
from data.keys import SEQUENCE_KEY
from data.schema import Metadata
from sharding.plan import ShardingError, check_types, paper_metadata, pooling_factor
from sharding.plan import main as plan_main
from tests.conftest import synthetic_dataset


def job_tables(meta: Metadata, cfg: JobConfig) -> list:
    """Every table of the job's tower: the EBC's, then the EmbeddingCollection's."""
    tower = towers.of(cfg)
    return tower.bag_tables(meta, cfg) + tower.sequence_tables(meta, cfg)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory, "small", 300, 100, 12, 8, 20)


def test_row_wise_on_cpu_fails_fast_naming_the_possible_types(small):
    tables = job_tables(Metadata.load(small), JobConfig())
    with pytest.raises(ShardingError) as err:
        check_types(ShardingConfig(per_table={"item_ids": ["row_wise"]}), tables, torch.device("cpu"))
    message = str(err.value)
    assert "sharding.per_table.item_ids" in message and "row_wise" in message
    assert "['data_parallel', 'table_wise', 'column_wise', 'table_column_wise']" in message
    check_types(ShardingConfig(per_table={"item_ids": ["row_wise"]}), tables, torch.device("cuda"))
    with pytest.raises(ShardingError, match="unknown tables"):
        check_types(ShardingConfig(per_table={"items": ["table_wise"]}), tables, torch.device("cpu"))


def test_pooling_factors_come_from_the_data(small):
    meta = Metadata.load(small)
    assert pooling_factor("hist_all", meta) == pytest.approx(meta.mean_history_length)
    assert pooling_factor("hist_last1", meta) == 1.0
    assert pooling_factor("hist_last10", meta) == pytest.approx(min(10.0, meta.mean_history_length))
    genre = next(f for f in meta.item_features if f.name == "i_genre")
    assert pooling_factor("cand_i_genre", meta) == pytest.approx(max(genre.mean_length, 1.0))


def test_plan_on_paper_for_eight_gpus(small, capsys):
    code = plan_main(["--config", "configs/synthetic.yaml", f"data.path={small}", "--world-size", "8",
                      "--device", "cuda", "--hbm-gb", "80", "--json", "sharding.per_table={item_ids: [row_wise]}"])
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    item = plan["ebc.item_ids"]
    assert item["sharding_type"] == "row_wise" and len(item["shards"]) == 8
    assert sorted(s["rank"] for s in item["shards"]) == list(range(8))
    assert plan_main(["--config", "configs/synthetic.yaml", f"data.path={small}", "--world-size", "2",
                      "sharding.per_table={item_ids: [row_wise]}"]) == 2
    assert "CPU cannot run" in capsys.readouterr().err


def test_paper_sizes_set_the_tables_and_the_pooling_factors():
    meta = paper_metadata(None, items=10**9, users=10**8, mean_history=300.0)
    assert (meta.item_vocab, meta.user_vocab) == (10**9 + 1, 10**8 + 1)
    assert pooling_factor(SEQUENCE_KEY, meta) == 300.0 and pooling_factor("hist_all", meta) == 300.0
    assert pooling_factor("hist_last10", meta) == 10.0
    cfg = load_config("configs/ml1m_transformer.yaml", ["loader.use_user_id=true"])
    tables = {t.name: t.num_embeddings for t in job_tables(meta, cfg)}
    assert tables == {"item_ids": 10**9 + 1, "user_ids": 10**8 + 1}, "no data: no feature tables"


@pytest.mark.parametrize("config", ["configs/ml1m.yaml", "configs/ml1m_transformer.yaml"])
def test_plan_on_paper_before_the_data_exists_reports_every_rank(config, tmp_path, capsys):
    args = ["--config", config, f"data.path={tmp_path / 'not-prepared'}", "--world-size", "4", "--device", "cuda",
            "--hbm-gb", "2", "--items", "1e7", "--users", "1e6", "--mean-history", "300", "--all-types", "--json"]
    assert plan_main(args) == 0
    out = json.loads(capsys.readouterr().out)
    items = next(v for k, v in out["plan"].items() if k.endswith("item_ids"))
    assert sum(s["sizes"][0] for s in items["shards"]) == 10**7 + 1
    assert items["sharding_type"] in ("row_wise", "table_row_wise", "column_wise", "table_column_wise"), \
        "2.4 GiB of item table (and its optimizer state) cannot sit whole on one 2 GiB device"
    ranks = out["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    weights = (10**7 + 1 + 10**6 + 1) * 64 * 4
    assert weights <= sum(r["hbm_bytes"] for r in ranks) and all(r["hbm_bytes"] <= 2 * 2**30 for r in ranks)
    assert all(r["step_ms"] > 0 for r in ranks)
    assert plan_main(args[:-1]) == 0
    table = capsys.readouterr().out
    assert "est. step ms" in table and "HBM GiB of 2" in table and len(table.splitlines()) >= 4 + 2


def test_plan_on_paper_that_cannot_fit_names_the_smallest_world_size(tmp_path, capsys):
    args = ["--config", "configs/ml1m_transformer.yaml", f"data.path={tmp_path}", "--device", "cuda",
            "--hbm-gb", "80", "--items", "1e10", "--mean-history", "300", "--all-types"]
    assert plan_main(args + ["--world-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "do not fit 8 ranks" in err
    smallest = int(err.split("the smallest world size that fits is ")[1].split()[0])
    assert plan_main(args + ["--world-size", str(smallest), "--json"]) == 0
    capsys.readouterr()
    assert plan_main(args + ["--world-size", str(smallest - 1)]) == 2, "the smallest: one rank fewer does not fit"
    assert plan_main(args + ["--world-size", "2", "--items", "0"]) == 2
    assert "--items must be at least 1" in capsys.readouterr().err


def test_plan_on_paper_holds_each_rank_to_the_host_memory_given(tmp_path, capsys):
    """On CPU the tables live in host memory: --host-gb caps each rank's share. Two 0.24 GiB tables do not fit
    one rank of 0.4 GiB; they fit two, one table each."""
    args = ["--config", "configs/ml1m.yaml", f"data.path={tmp_path}", "loader.use_user_id=true", "--device", "cpu",
            "--items", "1e6", "--users", "1e6", "--host-gb", "0.4"]
    assert plan_main(args + ["--world-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "do not fit 1 ranks" in err and "the smallest world size that fits is 2" in err
    assert plan_main(args + ["--world-size", "2", "--json"]) == 0
    ranks = json.loads(capsys.readouterr().out)["ranks"]
    assert all((10**6 + 1) * 64 * 4 <= r["host_bytes"] <= 0.4 * 2**30 for r in ranks)
    assert plan_main(args + ["--world-size", "2"]) == 0
    assert "host GiB of 0.4" in capsys.readouterr().out


@pytest.mark.parametrize("types", [["data_parallel"], ["table_column_wise"]])
def test_the_item_collection_refuses_types_torchrec_cannot_shard_it_with(small, types):
    meta = Metadata.load(small)
    tables = job_tables(meta, load_config(None, ["model.query_tower=transformer"]))
    with pytest.raises(ShardingError) as err:
        check_types(ShardingConfig(sharding_types=types), tables, torch.device("cpu"))
    message = str(err.value)
    assert "sharding.sharding_types" in message and "'item_ids'" in message and "sharding.per_table.item_ids" in message
    assert "['table_wise', 'column_wise', 'row_wise']" in message and "\n" not in message
    check_types(ShardingConfig(sharding_types=types, per_table={"item_ids": ["row_wise"]}), tables,
                torch.device("cpu"))


def test_a_compute_kernel_the_tables_cannot_use_is_named_before_any_work(small):
    tables = job_tables(Metadata.load(small), JobConfig())
    with pytest.raises(ConfigError, match="sharding.compute_kernel must be one of .* got 'dnse'"):
        load_config(None, ["sharding.compute_kernel=dnse"])
    with pytest.raises(ShardingError) as err:
        check_types(ShardingConfig(compute_kernel="dense"), tables, torch.device("cpu"))
    message = str(err.value)
    assert "sharding.compute_kernel=dense" in message and "sharding.sharding_types" in message
    assert "['table_wise']" in message and "\n" not in message
    check_types(ShardingConfig(sharding_types=["data_parallel"], compute_kernel="dense"), tables,
                torch.device("cpu"))
    with pytest.raises(ShardingError, match="fused_uvm_caching keeps tables in CUDA unified memory"):
        check_types(ShardingConfig(compute_kernel="fused_uvm_caching"), tables, torch.device("cpu"))
    check_types(ShardingConfig(compute_kernel="fused_uvm_caching"), tables, torch.device("cuda"))
