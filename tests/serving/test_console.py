"""The console filter (serving/console.py): the known library noise goes, everything else stays."""

from __future__ import annotations

import logging
import warnings

import pytest

from serving import console


@pytest.fixture
def isolated(monkeypatch):
    """Warning filters and logger filters as they were, after each test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = [logging.getLogger(name) for name in console.RECORDS]
        before = {logger.name: list(logger.filters) for logger in loggers}
        monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
        yield caught
        for logger in loggers:
            logger.filters[:] = before[logger.name]


def warn_from(module: str, message: str, category=FutureWarning) -> None:
    warnings.warn_explicit(message, category, filename=f"{module.replace('.', '/')}.py", lineno=1, module=module)


def test_known_warnings_go_and_others_stay(isolated):
    console.quiet()
    warn_from("torch.distributed.checkpoint.planner_helpers",
              "Please use DTensor instead and we are deprecating ShardedTensor.")
    warn_from("torchrec.distributed.planner.planners", "HeuristicalStorageReservation is known to cause issues, ...")
    warn_from("torch.distributed.checkpoint.planner_helpers", "something new and important")
    warn_from("trainer.loop", "Please use DTensor instead and we are deprecating ShardedTensor.")
    kept = [(str(w.message), w.filename) for w in isolated]
    assert kept == [("something new and important", "torch/distributed/checkpoint/planner_helpers.py"),
                    ("Please use DTensor instead and we are deprecating ShardedTensor.", "trainer/loop.py")]


def test_known_log_records_go_and_the_same_loggers_other_records_stay(isolated, caplog):
    console.quiet()
    console.quiet()  # idempotent: one filter per logger
    planner = logging.getLogger("torchrec.distributed.planner.types")
    assert sum(isinstance(f, console.DropKnown) for f in planner.filters) == 1
    with caplog.at_level(logging.INFO):
        planner.warning("The topology was constructed directly rather than via TopologyFactory")
        planner.warning("a table does not fit in memory")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    assert [r.getMessage() for r in caplog.records] == ["a table does not fit in memory"]
    assert console.os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_verbose_keeps_everything_and_other_ranks_drop_library_warnings(isolated):
    console.quiet(verbose=True)
    warn_from("torch.distributed.checkpoint.planner_helpers", "Please use DTensor instead and we are deprecating "
                                                              "ShardedTensor.")
    assert len(isolated) == 1 and "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in console.os.environ
    console.quiet(rank=1)
    warn_from("torchrec.distributed.model_parallel", "anything at all", UserWarning)
    warn_from("trainer.loop", "ours")
    assert [str(w.message) for w in isolated[1:]] == ["ours"], "rank 1 keeps only the project's own warnings"
