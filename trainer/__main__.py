"""python -m trainer --config configs/X.yaml [section.key=value ...] [--summary out.json] [--verbose]

Dev mode when started directly (one process, CPU or one GPU); one rank of a distributed job when
started by torchrun/torchx. The same command either way.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from config import ConfigError, JobConfig, load_config
from data.errors import DataError
from serving.console import quiet
from sharding.plan import ShardingError
from storage import StorageError, location
from trainer.checkpointing.checkpoint import CheckpointError
from trainer.distributed import DeviceError, WholeErrorFile
from trainer.evaluate import EvaluationError
from trainer.loop import TrainingError, train
from trainer.tracking.logger import TrackingError, tracking_uri

ERRORS = WholeErrorFile()


def fail(err: Exception, code: int, prefix: str = "") -> int:
    """One line for the user; under torchrun also the error file, so its summary names this rank's cause
    instead of `error_file: <N/A>`."""
    print(f"error: {prefix}{err}", file=sys.stderr)
    if "TORCHELASTIC_ERROR_FILE" in os.environ:
        ERRORS.record_exception(err)
    return code


def scripts_dir() -> str:
    """Where this interpreter's scripts are, as a shell without the venv activated reaches them: relative to the
    working directory when under it (.venv/bin)."""
    where = os.path.dirname(sys.executable)
    relative = os.path.relpath(where)
    return relative if not relative.startswith("..") else where


def next_steps(summary: dict, cfg: JobConfig) -> list[str]:
    """The commands to look at the run, serve its model and query its export, runnable as printed from a shell
    without the venv activated (`mlflow models serve` starts uvicorn from PATH), with real item ids."""
    bin_dir, lines = scripts_dir(), []
    uri = tracking_uri(cfg.tracking)
    history = summary.get("example_history") or []
    if "run_id" in summary and not summary.get("tracking_outbox"):
        page = f"#/experiments/{summary['experiment_id']}/runs/{summary['run_id']}?workflowType=machine_learning"
        if uri.startswith("http"):
            lines.append(f"MLflow run {summary['run_id']}: {uri.rstrip('/')}/{page}")
        else:
            lines += [f"MLflow run {summary['run_id']} in {uri}, at http://127.0.0.1:5000/{page} once the UI runs:",
                      f"  {bin_dir}/mlflow ui --backend-store-uri {uri} --port 5000"]
        if "export" in summary:
            name = cfg.tracking.register_as
            model = f"models:/{name}/latest" if name else f"runs:/{summary['run_id']}/model"
            body = json.dumps({"dataframe_records": [{"history": history}], "params": {"k": 5}})
            lines += [f"The model{f' (registered as {name})' if name else ''} over REST on port 5001, and a request:",
                      f"  PATH={bin_dir}:$PATH MLFLOW_TRACKING_URI={uri} {bin_dir}/mlflow models serve -m {model} "
                      f"--env-manager local --port 5001",
                      f"  curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '{body}'"]
    if "export" in summary:
        ids = ",".join(history) or '""'
        lines += ["Top-20 from the export for the last items of a test user's history:",
                  f"  {bin_dir}/python -m serving.recommend --run {summary['export']['dir']} --history {ids} -k 20"]
    return lines


@functools.partial(record, error_handler=ERRORS)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML job config (see configs/)")
    parser.add_argument("--summary", help="write the final metrics as JSON here (a local path or a URI)")
    parser.add_argument("--verbose", action="store_true", help="print everything: the sharding plan, INFO logs and "
                                                               "the libraries' known warnings (serving/console.py)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=3")
    args = parser.parse_intermixed_args(argv)
    quiet(args.verbose)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        summary = train(cfg, args.config)
    except (ConfigError, DataError, DeviceError, ShardingError, TrackingError, CheckpointError, StorageError) as err:
        return fail(err, 2)
    except EvaluationError as err:
        return fail(err, 1, "evaluation failed: ")
    except TrainingError as err:
        return fail(err, 1)
    from trainer import distributed

    distributed.shutdown()
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if args.summary:
        location(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    if summary.get("tracking_outbox"):
        outbox = summary["tracking_outbox"]
        print(f"warning: the MLflow run {summary['run_id']} in {tracking_uri(cfg.tracking)} is incomplete: what "
              f"could not be sent is in {outbox}. Once the server is back:\n"
              f"  .venv/bin/python -m trainer.tracking replay {outbox}", file=sys.stderr)
    for line in next_steps(summary, cfg):
        print(line)
    test = summary.get("test") or {}
    popular = summary.get("popularity_test") or {}
    counts = ("users", "skipped")
    print(f"test: {int(test['users'])} queries evaluated, {int(test['skipped'])} skipped (no rankable target)")
    print("test: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(test.items()) if k not in counts))
    if popular:
        print("popularity test: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(popular.items()) if k not in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
