"""Planner inputs and the fail-fast placement check; planning on paper for a larger cluster."""

from __future__ import annotations

import json

import pytest
import torch

from config import LoaderConfig, ModelConfig, ShardingConfig
from data.schema import Metadata
from sharding.plan import ShardingError, check_types, pooling_factor
from sharding.plan import main as plan_main
from sharding.tables import table_configs
from tests.conftest import synthetic_dataset


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory, "small", 300, 100, 12, 8, 20)


def test_row_wise_on_cpu_fails_fast_naming_the_possible_types(small):
    tables = table_configs(Metadata.load(small), LoaderConfig(), ModelConfig())
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
