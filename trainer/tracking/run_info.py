"""What identifies a run in MLflow: its name, the standard source and git tags, a description with the
data and the headline result, and the prepared dataset as a logged input. Pure functions of the
config, the data and the environment; trainer/loop.py hands them to the logger."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from pathlib import Path

import towers
from config import JobConfig, dump
from data import schema
from data.schema import Metadata
from storage import location

ROOT = Path(__file__).resolve().parents[1]
ARROW_TYPES = {"int64": "long", "int32": "integer", "double": "double", "string": "string"}  # MLflow DataType names


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def run_name(cfg: JobConfig, config_path: str | None) -> str:
    """`<config>-<query tower>-<hash>`: the config file, the query tower and 6 hex digits of the resolved config, so
    two runs of the same config share a name prefix and a changed override shows in the name."""
    stem = Path(config_path).stem if config_path else "cli"
    return f"{stem}-{towers.of(cfg).name}-{hashlib.sha256(dump(cfg).encode()).hexdigest()[:6]}"


def source_tags(config_path: str | None) -> dict[str, str]:
    """MLflow's standard tags (what the UI shows as Source, Created by and Git commit), plus whether
    the working tree had uncommitted changes, and the torchx job when torchx started this."""
    command = "python -m trainer" + (f" --config {config_path}" if config_path else "")
    tags = {"mlflow.source.name": command, "mlflow.user": getpass.getuser(),
            "mlflow.source.type": "JOB" if "TORCHELASTIC_RUN_ID" in os.environ else "LOCAL"}
    commit = git("rev-parse", "HEAD")
    if commit:
        tags.update({"mlflow.source.git.commit": commit, "mlflow.source.git.branch": git("rev-parse",
                                                                                          "--abbrev-ref", "HEAD"),
                     "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()})
        remote = git("config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = remote
    if os.environ.get("TORCHX_JOB_ID"):
        tags["torchx.job_id"] = os.environ["TORCHX_JOB_ID"]
    return tags


def description(cfg: JobConfig, meta: Metadata, world_size: int, device: str) -> str:
    tower = towers.of(cfg).summary
    return (f"Two-tower retrieval ({tower} query tower) on `{cfg.data.path}`: {meta.num_users:,} users, "
            f"{meta.num_items:,} items, {meta.counts['train_examples']:,} training examples, "
            f"{meta.split['protocol']} split, evaluated on the full catalogue"
            f"{' with seen items filtered' if cfg.eval.filter_seen else ''}. {world_size} process(es) on {device}.")


def result(summary: dict, metric: str) -> str:
    """The headline line appended to the description when the run ends."""
    test, popularity = summary["test"], summary.get("popularity_test") or {}
    line = (f"\n\n**Result**: epoch {summary['best_epoch']} selected on validation {metric}; test "
            f"HR@10 {test.get('hr@10', float('nan')):.4f}, NDCG@10 {test.get('ndcg@10', float('nan')):.4f} "
            f"over {int(test['users']):,} queries")
    if popularity:
        line += f" (popularity: HR@10 {popularity.get('hr@10', float('nan')):.4f})"
    return line + "."


def dataset(cfg: JobConfig, meta: Metadata) -> dict:
    """The prepared data as an MLflow dataset: source, digest (of its metadata), the training schema and
    the row counts of every split. MLflow is imported here, on the rank that tracks (see trainer.tracking)."""
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    directory = location(cfg.data.path)
    arrow = (directory / meta.files[schema.TRAIN_DIR][0]).parquet_file().schema_arrow
    columns = []
    for name, kind in zip(arrow.names, arrow.types):
        value = getattr(kind, "value_type", None)
        columns.append(ColSpec(Array(DataType[ARROW_TYPES.get(str(value), "string")]), name) if value is not None
                       else ColSpec(DataType[ARROW_TYPES.get(str(kind), "string")], name))
    digest = hashlib.sha256((directory / schema.METADATA_FILE).read_bytes()).hexdigest()[:16]
    source = directory.uri if not directory.is_local else str(directory.local_path)
    profile = {"users": meta.num_users, "items": meta.num_items, "train_examples": meta.counts["train_examples"],
               "valid_queries": meta.counts["valid_rows"], "test_queries": meta.counts["test_rows"],
               "protocol": meta.split["protocol"], "source_checksum": meta.source.get("checksum")}
    return {"name": directory.name, "digest": digest, "source": source, "schema": json.dumps(
        {"mlflow_colspec": Schema(columns).to_dict()}), "profile": profile, "context": "training"}
