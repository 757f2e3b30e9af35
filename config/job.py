"""The config sections and their checks. Every field is read somewhere; each check names its key."""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer name, its class, and where it may run: `fused` is the device class on which
    FBGEMM runs it fused into the embedding backward ("cpu": everywhere, "gpu": CUDA only, "": never)."""

    path: str
    fused: str
    dense: bool


# The one list of optimizer names: config checks read it, the trainer resolves `path` from it.
OPTIMIZERS = {
    "rowwise_adagrad": OptimizerSpec("torchrec.optim.rowwise_adagrad.RowWiseAdagrad", fused="cpu", dense=False),
    "adagrad": OptimizerSpec("torch.optim.Adagrad", fused="cpu", dense=True),
    "sgd": OptimizerSpec("torch.optim.SGD", fused="cpu", dense=True),
    "adam": OptimizerSpec("torch.optim.Adam", fused="gpu", dense=True),
}
SPARSE_OPTIMIZERS = tuple(name for name, spec in OPTIMIZERS.items() if spec.fused)
CPU_FUSED_OPTIMIZERS = tuple(name for name, spec in OPTIMIZERS.items() if spec.fused == "cpu")
DENSE_OPTIMIZERS = tuple(name for name, spec in OPTIMIZERS.items() if spec.dense)
INDEX_KINDS = ("hnsw", "flat")
# TorchRec's training compute kernels: "dense" is a replicated (data-parallel) table, the uvm ones need CUDA.
COMPUTE_KERNELS = ("fused", "dense", "fused_uvm", "fused_uvm_caching")
METRICS = ("hr", "recall", "ndcg", "mrr", "coverage")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


# What a resume from a checkpoint may change (trainer/checkpointing/compatibility.py reads it), marked on each
# field or section below: SAFE without asking (how long to train, how often to log and save, where to track and export);
# SHAPE never (it changes what the checkpoint's tensors are); POSITION with checkpoint.allow_changes and only at an
# epoch boundary (it changes what a saved batch position means). Any other key needs checkpoint.allow_changes.
SAFE, SHAPE, POSITION = "safe", "shape", "position"


def resume(kind: str, default=MISSING, *, factory=MISSING):
    """A field (or a whole section) with its resume rule."""
    return field(default=default, default_factory=factory, metadata={"resume": kind})


def resume_rules(cls: type, prefix: str = "") -> dict[str, str]:
    """Key -> SAFE/SHAPE/POSITION for every marked field of a config dataclass; a marked section counts for all
    its keys, as `section.`."""
    rules, hints = {}, typing.get_type_hints(cls)
    for f in fields(cls):
        key, section = f"{prefix}{f.name}", is_dataclass(hints[f.name])
        if "resume" in f.metadata:
            rules[key + ("." if section else "")] = f.metadata["resume"]
        elif section:
            rules.update(resume_rules(hints[f.name], f"{key}."))
    return rules


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class DataConfig:
    path: str = resume(SAFE, "prepared/synthetic")  # the data may move: its checksum is compared instead


@dataclass
class LoaderConfig:
    batch_size: int = resume(POSITION, 1024)
    # Mean-pooled last-k bags of the history (0 = all of it) in the query; the transformer pools them from its
    # unpooled lookup, at every position ([] for none).
    history_bags: list[int] = resume(SHAPE, factory=lambda: [1, 10, 0])
    use_user_id: bool = resume(SHAPE, False)
    out_of_vocab: str = "error"  # "error", or "hash" (id modulo the vocabulary, for open vocabularies)
    # Transformer tower: the inputs of one training row (a user's sequence is cut into chunks of this many,
    # aligned on its newest item); evaluation queries keep their last this many items.
    max_sequence_length: int = 200
    # Each query feature (user id, user and context features) of a training row is replaced by the padding id
    # (an empty list for list features) with this probability, so a feature missing at serving time maps to a
    # trained embedding (cold start).
    feature_dropout: float = 0.1
    shuffle_buffer: int = 65_536  # rows mixed across row groups before batching
    # Sequence towers: each shuffle buffer's batches are cut from its rows sorted by length (then sent in random
    # order), so the padded causal stack computes little padding. false: batches of random rows.
    bucket_by_length: bool = resume(POSITION, False)
    # Sequence towers: a training batch's rows are packed into lanes as long as its longest row (data.ragged.
    # pack_lanes), attention kept inside each row, so the stack skips most padding while the batch stays a
    # random draw. The same outputs as padding each row (false), up to float rounding and the dropout draws. The
    # bag tower has no stack: its rows are single examples, and the key changes nothing there.
    pack_rows: bool = resume(SAFE, True)
    prefetch_batches: int = resume(SAFE, 4)
    seed: int = 0  # not a config key: the job's top-level seed is copied here

    def __post_init__(self) -> None:
        check(min(self.batch_size, self.shuffle_buffer, self.prefetch_batches) >= 1,
              "loader.batch_size, loader.shuffle_buffer and loader.prefetch_batches must be >= 1")
        check(self.out_of_vocab in ("error", "hash"), f"loader.out_of_vocab must be 'error' or 'hash', got "
                                                      f"'{self.out_of_vocab}'")
        check(self.max_sequence_length >= 1, "loader.max_sequence_length must be >= 1")
        check(0 <= self.feature_dropout < 1, f"loader.feature_dropout must be in [0, 1), got {self.feature_dropout}")
        check(min(self.history_bags, default=0) >= 0 and len(set(self.history_bags)) == len(self.history_bags),
              f"loader.history_bags must be distinct non-negative lengths, got {self.history_bags}")


@dataclass
class ModelConfig:
    item_dim: int = 64  # the item id table (shared by history bags and the candidate tower by default)
    feature_dim: int = 16  # user, context and item feature tables
    hidden_dims: list[int] = field(default_factory=lambda: [256])
    output_dim: int = 64
    # The query tower (towers/: each registered tower's module says what it is), and its own section: only the
    # chosen tower's fields, typed by its dataclass once towers.resolve(cfg) has run ("": the registry's default).
    query_tower: str = ""
    tower: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(isinstance(self.tower, dict) or is_dataclass(self.tower),
              f"model.tower must be a mapping (the {self.query_tower or 'default'} tower's fields), got {self.tower!r}")
        check(self.item_dim % 4 == 0 and self.feature_dim % 4 == 0 and min(self.item_dim, self.feature_dim) > 0,
              "model.item_dim and model.feature_dim must be positive multiples of 4 (FBGEMM row alignment)")
        check(self.output_dim >= 1 and all(d >= 1 for d in self.hidden_dims),
              "model.output_dim and model.hidden_dims must be >= 1")


# A query's negatives (data/negatives.py): the other rows' positives (in_batch), items drawn from the catalogue
# (uniform, or frequency: count ** alpha), or both (mixed: in-batch plus count ** alpha, alpha 0 = uniform); or
# every item of the catalogue at every step (catalogue: the exact full softmax, for catalogues up to ~10^5 items).
NEGATIVE_KINDS = ("mixed", "in_batch", "uniform", "frequency", "catalogue")


@dataclass
class NegativesConfig:
    kind: str = "mixed"
    num_sampled: int = 1024  # items drawn per batch (per rank) by the sampling kinds; in_batch draws none
    alpha: float = 0.75  # frequency and mixed: q(j) is proportional to count(j) ** alpha (0: every item alike)

    def __post_init__(self) -> None:
        check(self.kind in NEGATIVE_KINDS, f"negatives.kind must be one of {NEGATIVE_KINDS}, got '{self.kind}'")
        check(self.kind in ("in_batch", "catalogue") or self.num_sampled >= 1,
              f"negatives.kind={self.kind} draws negatives.num_sampled >= 1 items, got {self.num_sampled} "
              "(negatives.kind=in_batch for none)")
        check(self.alpha >= 0, f"negatives.alpha must be >= 0, got {self.alpha}")

    @property
    def in_batch(self) -> bool:
        """The other rows' positives (of the global batch) are a query's negatives."""
        return self.kind in ("mixed", "in_batch")

    def per_batch(self, num_items: int) -> int:
        """Items drawn from a catalogue of `num_items` per batch."""
        return {"in_batch": 0, "catalogue": num_items}.get(self.kind, self.num_sampled)


FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class LossConfig:
    temperature: float = 0.05
    logq: bool = resume(SHAPE, True)
    logq_on_positive: bool = True
    frequency: str = resume(SHAPE, "exact")  # "exact" catalogue counts, or "streaming" (Yi et al. 2019)
    streaming_alpha: float = 0.01
    streaming_buckets: int = resume(SHAPE, 1 << 20)
    # Logits are computed in row chunks of at most this many (query x candidate) entries, each chunk's gradient
    # at once, which bounds the loss's memory; the result equals one big computation. 2^20 (4 MB of float32)
    # stays in cache: measured fastest on this machine for the transformer's ~14k positions x 3.5k candidates.
    max_logits: int = 1 << 20
    # One logit column per distinct candidate item, its bias raised by log(copies): the same loss and per-item
    # gradients as one column per copy, with fewer logits (trainer/loss/kernel.py). false: one column per copy.
    merge_duplicates: bool = True
    # Sequence towers: a position's negatives leave out the items it has already read (its row up to and
    # including it), its own target excepted. With eval.filter_seen those items are never ranked, so training stops
    # spending capacity on pushing them down (trainer/loss/kernel.py:seen_hits).
    mask_seen: bool = False

    def __post_init__(self) -> None:
        check(self.max_logits >= 1, "loss.max_logits must be >= 1")
        check(self.frequency in ("exact", "streaming"), f"loss.frequency must be 'exact' or 'streaming', got "
                                                        f"'{self.frequency}'")
        # Logits are float32 and scaled by 1/T: below ~3e-39 the scale itself is not a float32.
        check(self.temperature > 0 and 1.0 / self.temperature < FLOAT32_MAX,
              f"loss.temperature must be > 0 and 1/temperature a finite float32, got {self.temperature}")
        check(0 < self.streaming_alpha <= 1 and self.streaming_buckets >= 1,
              "loss.streaming_alpha must be in (0, 1] and loss.streaming_buckets >= 1")


@dataclass
class OptimConfig:
    sparse: str = resume(SHAPE, "rowwise_adagrad")  # fused into the embedding backward; adam needs a GPU
    sparse_lr: float = 0.05
    dense: str = resume(SHAPE, "adam")  # adam, adagrad or sgd, over the MLPs only
    dense_lr: float = 0.001
    # After each epoch without a validation gain, both rates are multiplied by this (1: constant rates).
    plateau_decay: float = 1.0

    def __post_init__(self) -> None:
        check(self.sparse in SPARSE_OPTIMIZERS, f"optim.sparse must be one of {SPARSE_OPTIMIZERS}, got '{self.sparse}'")
        check(self.dense in DENSE_OPTIMIZERS, f"optim.dense must be one of {DENSE_OPTIMIZERS}, got '{self.dense}'")
        check(self.sparse_lr > 0 and self.dense_lr > 0, "optim.sparse_lr and optim.dense_lr must be > 0")
        check(0 < self.plateau_decay <= 1, f"optim.plateau_decay must be in (0, 1], got {self.plateau_decay}")


@dataclass
class TrainConfig:
    epochs: int = resume(SAFE, 10)
    max_steps: int = resume(SAFE, 0)  # 0 = no cap; handy for smoke runs
    log_every: int = resume(SAFE, 20)
    early_stopping_metric: str = "ndcg@10"
    early_stopping_patience: int = resume(SAFE, 2)  # stop after this many epochs in a row without improvement
    device: str = resume(SAFE, "auto")  # auto, cpu or cuda
    collective_timeout_s: int = resume(SAFE, 600)  # a dead rank fails the job after this long instead of hanging
    # bf16: the towers' dense layers under bfloat16 autocast and the loss's matrix products in bfloat16 (weights,
    # optimizer state, exponentials and sums stay float32; evaluation and export run in float32). Faster where
    # the CPU has bf16 instructions (AVX512-BF16, AMX) and on GPUs; docs/training.md "Precision".
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check(self.device in DEVICES, f"train.device must be auto, cpu or cuda, got '{self.device}'")
        check(self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got '{self.precision}'")
        check(self.epochs >= 1 and self.log_every >= 1 and self.max_steps >= 0 and self.early_stopping_patience >= 0
              and self.collective_timeout_s >= 1,
              "train.epochs, train.log_every and train.collective_timeout_s must be >= 1, train.max_steps and "
              "train.early_stopping_patience >= 0")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [10, 50, 200])
    batch_size: int = resume(SAFE, 1024)
    popularity_baseline: bool = resume(SAFE, True)
    # Remove what the user consumed before the query from the ranking; targets among those are left out
    # (docs/data.md "Evaluation protocol"). false: rank everything, for domains where repeats are the point.
    filter_seen: bool = True

    def __post_init__(self) -> None:
        check(bool(self.ks) and min(self.ks) >= 1, "eval.ks must list positive cut-offs")
        check(self.batch_size >= 1, "eval.batch_size must be >= 1")


@dataclass
class ShardingConfig:
    sharding_types: list[str] = field(default_factory=lambda: ["table_wise"])
    compute_kernel: str = "fused"
    per_table: dict[str, list[str]] = field(default_factory=dict)  # table name -> allowed sharding types

    def __post_init__(self) -> None:
        check(self.compute_kernel in COMPUTE_KERNELS, f"sharding.compute_kernel must be one of {COMPUTE_KERNELS}, "
                                                      f"got '{self.compute_kernel}'")


@dataclass
class CheckpointConfig:
    dir: str = resume(SAFE, "")  # empty: no checkpoints; otherwise the job resumes from the latest one here
    every_steps: int = resume(SAFE, 0)  # also checkpoint every N steps (0: only at the end of each epoch)
    keep_last: int = resume(SAFE, 3)
    # Config keys a resume may change beyond the always-safe ones (docs/reliability.md), e.g. [optim.sparse_lr].
    allow_changes: list[str] = resume(SAFE, factory=list)

    def __post_init__(self) -> None:
        check(self.keep_last >= 1 and self.every_steps >= 0,
              "checkpoint.keep_last must be >= 1 and checkpoint.every_steps >= 0")


@dataclass
class ExportConfig:
    enabled: bool = True  # export the best epoch's model at the end of training, and log it to MLflow
    dir: str = "exports"  # the export goes to <dir>/<MLflow run id> (or <dir>/untracked-<time>)
    index: str = "hnsw"  # ANN index over the item embeddings: hnsw (faiss HNSW), or flat (exact search)
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    recall_queries: int = 2000  # validation queries the index's recall@10 against exact search is measured on

    def __post_init__(self) -> None:
        check(self.index in INDEX_KINDS, f"export.index must be one of {INDEX_KINDS}, got '{self.index}'")
        check(min(self.hnsw_m, self.hnsw_ef_construction, self.hnsw_ef_search, self.recall_queries) >= 1,
              "export.hnsw_m, export.hnsw_ef_construction, export.hnsw_ef_search and export.recall_queries must "
              "be >= 1")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else the embedded sqlite:///mlflow.db
    experiment: str = "two-tower"
    run_name: str = ""
    request_timeout_s: int = 10  # bounds each MLflow HTTP call, so logging never stalls training for long
    flush_timeout_s: int = 60  # at the end, how long to wait for unsent records before writing them to the outbox
    outbox: str = "mlflow-outbox"  # unsent records go to <outbox>/<run id>.jsonl (python -m trainer.tracking replay)
    system_metrics_every_s: int = 10  # CPU and memory (GPU memory where present) into the run; 0 = off
    register_as: str = ""  # register the exported model under this name in the Model Registry ("": do not)

    def __post_init__(self) -> None:
        check(self.request_timeout_s >= 1 and self.flush_timeout_s >= 0 and self.system_metrics_every_s >= 0,
              "tracking.request_timeout_s must be >= 1, tracking.flush_timeout_s and "
              "tracking.system_metrics_every_s >= 0")


@dataclass
class JobConfig:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)
    model: ModelConfig = resume(SHAPE, factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = resume(SAFE, factory=ExportConfig)
    tracking: TrackingConfig = resume(SAFE, factory=TrackingConfig)

    def __post_init__(self) -> None:
        self.loader.seed = self.seed
        name, _, k = self.train.early_stopping_metric.partition("@")
        check((name == "mrr" and not k) or (name in METRICS and k.isdigit() and int(k) in self.eval.ks),
              f"train.early_stopping_metric '{self.train.early_stopping_metric}' must be mrr or "
              f"<{'|'.join(METRICS[:-1])}|coverage>@K with K in eval.ks {self.eval.ks}")
