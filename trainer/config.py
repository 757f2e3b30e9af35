"""The job config: typed dataclasses, loaded strictly from YAML plus `key=value` overrides.

Unknown keys, wrong types and inconsistent combinations fail before any work, naming the key.
The resolved config is what gets logged to MLflow, so a run can always be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.loader import LoaderConfig

CPU_FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
SPARSE_OPTIMIZERS = CPU_FUSED_OPTIMIZERS + ("adam",)
DENSE_OPTIMIZERS = ("adam", "adagrad", "sgd")
INDEX_KINDS = ("hnsw", "flat")
METRICS = ("hr", "recall", "ndcg", "mrr", "coverage")


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    path: str = "prepared/synthetic"


@dataclass
class ModelConfig:
    item_dim: int = 64  # the item id table (shared by history bags and the candidate tower by default)
    feature_dim: int = 16  # user, context and item feature tables
    hidden_dims: list[int] = field(default_factory=lambda: [256])
    output_dim: int = 64
    share_item_table: bool = True


@dataclass
class LossConfig:
    temperature: float = 0.05
    in_batch: bool = True  # in-batch positives of other rows are negatives; mixed ones come from loader.num_negatives
    logq: bool = True
    logq_on_positive: bool = True
    frequency: str = "exact"  # "exact" catalogue counts, or "streaming" (Yi et al. 2019)
    streaming_alpha: float = 0.01
    streaming_buckets: int = 1 << 20


@dataclass
class OptimConfig:
    sparse: str = "rowwise_adagrad"  # fused into the embedding backward; adam needs a GPU
    sparse_lr: float = 0.05
    dense: str = "adam"  # adam, adagrad or sgd, over the MLPs only
    dense_lr: float = 0.001


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # 0 = no cap; handy for smoke runs
    log_every: int = 20
    early_stopping_metric: str = "ndcg@10"
    early_stopping_patience: int = 2
    device: str = "auto"  # auto, cpu or cuda
    collective_timeout_s: int = 600  # a dead rank fails the job after this long instead of hanging it


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    batch_size: int = 1024
    popularity_baseline: bool = True
    # Remove what the user consumed before the query from the ranking; targets among those are left out
    # (README "Evaluation protocol"). false: rank everything, for domains where repeats are the point.
    filter_seen: bool = True


@dataclass
class ShardingConfig:
    sharding_types: list[str] = field(default_factory=lambda: ["table_wise"])
    compute_kernel: str = "fused"
    per_table: dict[str, list[str]] = field(default_factory=dict)  # table name -> allowed sharding types


@dataclass
class CheckpointConfig:
    dir: str = ""  # empty: no checkpoints; otherwise the job resumes from the latest one here
    every_steps: int = 0  # also checkpoint every N steps (0: only at the end of each epoch)
    keep_last: int = 3


@dataclass
class ExportConfig:
    enabled: bool = True  # export the best epoch's model at the end of training, and log it to MLflow
    dir: str = "exports"  # the export goes to <dir>/<MLflow run id> (or <dir>/untracked-<time>)
    index: str = "hnsw"  # ANN index over the item embeddings: hnsw (faiss HNSW), or flat (exact search)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    recall_queries: int = 2000  # validation queries the index's recall@10 against exact search is measured on


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else the embedded sqlite:///mlflow.db
    experiment: str = "two-tower"
    run_name: str = ""
    request_timeout_s: int = 10  # bounds each MLflow HTTP call, so logging never stalls training for long


@dataclass
class JobConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        self.loader.seed = self.seed
        validate(self)


def validate(cfg: JobConfig) -> None:
    """Cross-field checks; each message names the keys involved."""
    if not cfg.loss.in_batch and cfg.loader.num_negatives == 0:
        raise ConfigError("loss.in_batch=false needs loader.num_negatives > 0: there would be no negatives")
    if cfg.loss.frequency not in ("exact", "streaming"):
        raise ConfigError(f"loss.frequency must be 'exact' or 'streaming', got '{cfg.loss.frequency}'")
    if cfg.loss.temperature <= 0:
        raise ConfigError("loss.temperature must be > 0")
    if cfg.optim.sparse not in SPARSE_OPTIMIZERS:
        raise ConfigError(f"optim.sparse must be one of {SPARSE_OPTIMIZERS}, got '{cfg.optim.sparse}'")
    if cfg.optim.dense not in DENSE_OPTIMIZERS:
        raise ConfigError(f"optim.dense must be one of {DENSE_OPTIMIZERS}, got '{cfg.optim.dense}'")
    if cfg.train.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got '{cfg.train.device}'")
    name, _, k = cfg.train.early_stopping_metric.partition("@")
    if name not in METRICS or (name != "mrr" and (not k.isdigit() or int(k) not in cfg.eval.ks)):
        raise ConfigError(f"train.early_stopping_metric '{cfg.train.early_stopping_metric}' must be mrr or "
                          f"<{'|'.join(METRICS[:-1])}|coverage>@K with K in eval.ks {cfg.eval.ks}")
    if cfg.train.epochs < 1 or cfg.train.log_every < 1 or cfg.train.max_steps < 0:
        raise ConfigError("train.epochs and train.log_every must be >= 1, train.max_steps >= 0")
    if cfg.checkpoint.keep_last < 1 or cfg.checkpoint.every_steps < 0:
        raise ConfigError("checkpoint.keep_last must be >= 1 and checkpoint.every_steps >= 0")
    if cfg.export.index not in INDEX_KINDS:
        raise ConfigError(f"export.index must be one of {INDEX_KINDS}, got '{cfg.export.index}'")
    x = cfg.export
    if min(x.hnsw_m, x.hnsw_ef_construction, x.hnsw_ef_search, x.recall_queries) < 1:
        raise ConfigError("export.hnsw_m, export.hnsw_ef_construction, export.hnsw_ef_search and "
                          "export.recall_queries must be >= 1")
    if not cfg.eval.ks or min(cfg.eval.ks) < 1:
        raise ConfigError("eval.ks must list positive cut-offs")
    if cfg.model.item_dim % 4 or cfg.model.feature_dim % 4:
        raise ConfigError("model.item_dim and model.feature_dim must be multiples of 4 (FBGEMM row alignment)")


def from_dict(cls, data: dict, where: str = ""):
    """Builds dataclass `cls` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - ({"seed"} if cls is LoaderConfig else set())
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}"
                          f" (allowed in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = coerce(hints[key], value, f"{where}{key}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {err}") from err


def coerce(hint, value, key: str):
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value or {}, f"{key}.")
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): coerce(item, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def apply_override(data: dict, override: str) -> None:
    """`a.b.c=value` with a YAML value (so 3, 0.1, true, [1, 2] keep their types)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
    node[parts[-1]] = parse_yaml(raw, f"override '{override}'")


def parse_yaml(text: str, where: str):
    """YAML, with a syntax error reported as `where: line L, column C: problem` on one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {position}invalid YAML: {problem}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    data: dict = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot be read: {err}") from None
        data = parse_yaml(text, str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    return from_dict(JobConfig, data)


def to_dict(cfg) -> dict:
    data = dataclasses.asdict(cfg)
    data["loader"].pop("seed")
    return data


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def dump(cfg: JobConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
