"""Sequence-tower training-step throughput (transformer and HSTU): the project against plain PyTorch, same
model, loss and rows.

    torchrec              what `python -m trainer` runs with the tower's committed config: the EmbeddingCollection
                          with fused rowwise Adagrad in the backward, TrainPipelineSparseDist, fused dense Adam, the
                          loss with one logit column per distinct candidate item (loss.merge_duplicates), and the
                          loader's batches (rows bucketed by length where the config sets loader.bucket_by_length)
    torchrec_random       the same over batches of random rows (loader.bucket_by_length=false), or
    torchrec_bucketed     over bucketed ones (loader.bucket_by_length=true), whichever the config does not do:
                          what bucketing buys
    torchrec_unmerged     the same with loss.merge_duplicates=false (one column per candidate copy, as the plain
                          baselines compute it): the difference is what merging buys
    torchrec_bf16         `torchrec` with train.precision=bf16 (bfloat16 autocast in the towers, bfloat16 products
                          in the loss; trainer/precision.py), and
    torchrec_bucketed_bf16  the same over bucketed rows; the plain baselines always run float32
    torchrec_padded       `torchrec` with loader.pack_rows=false: each row padded to the batch's longest, where
                          the default packs rows several to a lane of the stack (data.ragged.pack_lanes,
                          attention kept inside each row): what packing buys; and
    torchrec_padded_bf16  the same in bf16
    torchrec_padded_512   `torchrec_padded` with both MLPs [512] wide: the transformer's ML-1M epoch as it was before
                          packed rows and [256] MLPs, the baseline of the epoch's speed-up
    sparse_adam           the same `SequenceHead` behind nn.Embedding(sparse=True) + SparseAdam, fused Adam on the
                          rest, over batches of random rows: what an expert writes in plain PyTorch
    sparse_adam_bucketed  the same over the project's bucketed batches: how much of the difference is the batching
    dense_adam            nn.Embedding + one Adam over every parameter, random rows: the tutorials' way

Every implementation runs the same `SequenceHead` (serving/sequence.py) and `SequenceRetrievalLoss` on batches
cut from the same shuffle buffer of rows (random or bucketed), so the comparison is the batching, the lookup, the
optimizer, the step's plumbing and the merged columns.
The model is each tower's committed ML-1M config (32 chunks of up to 200 items, about 3,200 positions a step,
4,096 uniform negatives, 2 blocks, history bags, MLP [512]) over a synthetic catalogue of N items with Zipf(1)
popularity and no features. Throughput counts real positions; each row reports the share of the positions its
causal stack computed that were padding.

Steps: every (tower, implementation, catalogue size) runs in a fresh subprocess (its peak RSS its own) on the same
rows, `--warmup` steps then `--steps` timed; each configuration runs in `--repeats` processes, interleaved
across implementations, and the table reports the median. `--epoch` adds the ML-1M training epoch end to end
(the project's loader, step and log lines, no evaluation) for every tower, the project's Trainer against a plain
loop over the same loader. `--profile` writes a Chrome trace of one project step at 10^6 items.

    .venv/bin/python -m bench.sequence_step [--towers ...] [--sizes ...] [--epoch prepared/ml-1m] [--profile]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torchrec import KeyedJaggedTensor

import towers
from bench.common import machine, peak_rss_mib, tower_configs
from bench.train_step import catalogue_meta, popularity
from config import JobConfig, load_config
from data import schema
from data.batch import SequenceBatch, TrainBatch, make_kjt, no_lanes
from data.keys import ITEM_KEY, SEQUENCE_KEY, QueryLayout, candidate_keys
from data.loader import bucketed
from data.negatives import Negatives
from data.ragged import pack_lanes
from towers.shared import kjt_features
from trainer.loss.modules import build_loss

ROOT = Path(__file__).resolve().parents[1]
# Tower name -> its committed ML-1M config, for each sequence tower.
SEQUENCE_CONFIGS = tower_configs(("configs/ml1m_transformer.yaml", "configs/ml1m_hstu.yaml"))
# The ML-1M epochs: each tower's committed config, by tower name.
EPOCH_CONFIGS = tower_configs(("configs/ml1m.yaml", *SEQUENCE_CONFIGS.values()))
IMPLS = ("torchrec", "torchrec_random", "torchrec_bucketed", "torchrec_unmerged", "torchrec_bf16",
         "torchrec_bucketed_bf16", "torchrec_padded", "torchrec_padded_bf16", "torchrec_padded_512", "sparse_adam",
         "sparse_adam_bucketed", "dense_adam")
WIDE_MLP = [512]  # torchrec_padded_512's hidden layer: the width the sequence configs had before [256]
RESULTS = ROOT / "bench" / "results"


def job_config(config: str, data: str | None = None, impl: str = "torchrec") -> JobConfig:
    overrides = ["tracking.enabled=false", "export.enabled=false"] + ([f"data.path={data}"] if data else [])
    overrides += ["loss.merge_duplicates=false"] if impl == "torchrec_unmerged" else []
    overrides += ["train.precision=bf16"] if impl.endswith("_bf16") else []
    # The plain loops pad each row to the batch's longest, as plain PyTorch does.
    overrides += ["loader.pack_rows=false"] if "_padded" in impl or not impl.startswith("torchrec") else []
    overrides += [f"model.hidden_dims={WIDE_MLP}"] if impl.endswith("_512") else []
    return towers.resolve(load_config(str(ROOT / config), overrides))


def batch_rows(cfg: JobConfig, count: int, bucket: bool, rng: np.random.Generator,
               pool: int = 270) -> tuple[np.ndarray, np.ndarray]:
    """(row lengths, the rows of `count` batches (count, batch_size)): rows of 1..max_sequence_length items
    (uniform, so about ML-1M's mean chunk), cut from a shuffle buffer of max(count, pool) batches (ML-1M's epoch
    is 270 batches of 32 chunks, one buffer) into random batches, or bucketed as the loader does. Either way the
    batches come from the same buffer, so their rows follow the same length distribution; throughput is counted
    in real positions, which makes the two comparable."""
    b, total = cfg.loader.batch_size, max(count, pool) * cfg.loader.batch_size
    lengths = rng.integers(1, cfg.loader.max_sequence_length + 1, total)
    order = rng.permutation(total)
    return lengths, (bucketed(order, lengths, b, rng) if bucket else order)[:count * b].reshape(count, b)


def sequence_batches(cfg: JobConfig, num_items: int, probs: np.ndarray, count: int, seed: int,
                     bucket: bool) -> tuple[list[SequenceBatch], Negatives]:
    """`count` batches built as `SequenceLoader.make_batch` builds them from `batch_rows`' rows, every position
    trained, candidates = the distinct targets then the sampled negatives. A row's items depend on the row
    alone (its index in the buffer)."""
    rng = np.random.default_rng(seed)
    lengths_of, batches = batch_rows(cfg, count, bucket, rng)
    cdf = np.cumsum(probs)

    def draw(row: int, n: int) -> np.ndarray:
        u = np.random.default_rng([seed, row]).random(n)
        return np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), num_items).astype(np.int64)

    negatives = Negatives.of(cfg.negatives, (probs * 1e9).astype(np.int64) + (np.arange(len(probs)) > 0))
    b = cfg.loader.batch_size
    out = []
    for rows in batches:
        lengths = lengths_of[rows]
        drawn = [draw(int(r), 2 * int(n)) for r, n in zip(rows, lengths)]
        inputs = np.concatenate([d[:len(d) // 2] for d in drawn])
        targets = np.concatenate([d[len(d) // 2:] for d in drawn])
        row = np.repeat(np.arange(b), lengths)
        step = np.arange(len(inputs)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        distinct, own = np.unique(targets, return_inverse=True)
        candidates = np.concatenate([distinct, negatives.sample(rng)])
        c = len(candidates)
        sequence = make_kjt([SEQUENCE_KEY, ITEM_KEY], [(np.r_[lengths, np.zeros(c, np.int64)], inputs),
                                                       (np.r_[np.zeros(b, np.int64), np.ones(c, np.int64)],
                                                        candidates)])
        empty = KeyedJaggedTensor(keys=[], values=torch.zeros(0, dtype=torch.long),
                                  lengths=torch.zeros(0, dtype=torch.int32))
        lanes = torch.from_numpy(pack_lanes(lengths, int(lengths.max()))) if cfg.loader.pack_rows else no_lanes()
        out.append(SequenceBatch(sparse=empty, sequence=sequence, lanes=lanes,
                                 positions=torch.from_numpy(row * int(lengths.max()) + step),
                                 own_column=torch.from_numpy(own.reshape(-1)),
                                 candidate_ids=torch.from_numpy(candidates),
                                 num_positives=torch.tensor([len(distinct)]),
                                 row_mask=torch.ones(b, dtype=torch.bool)))
    return out, negatives


class PlainSequenceModel(torch.nn.Module):
    """The transformer tower and its loss in plain PyTorch: `PlainSequenceTower`'s modules, fed the way
    `SequenceTwoTower.encode` feeds `SequenceHead` (one item table for history and candidates; feature bags
    pooled over the batch's P + C rows, queries first)."""

    def __init__(self, cfg: JobConfig, meta: schema.Metadata, freq: np.ndarray, negatives: Negatives,
                 sparse: bool):
        super().__init__()
        self.query_keys = QueryLayout.for_data(meta, (), cfg.loader.use_user_id).keys
        self.candidate_keys = candidate_keys([f.name for f in meta.item_features])[1:]
        self.tower = towers.of(cfg).plain(meta, cfg, sparse=sparse)
        self.loss_fn = build_loss(cfg, negatives, freq, sequence=True, merge=False, precision="fp32")

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        sequence = kjt_features(batch.sequence)
        lengths, history = sequence[SEQUENCE_KEY]
        p = batch.positions.shape[0]
        features = kjt_features(batch.sparse) if self.query_keys or self.candidate_keys else {}
        pooled = {k: self.tower.pooled(k, *features[k]) for k in self.query_keys + self.candidate_keys}
        query, candidates = self.tower.head(self.tower.items(history), lengths[:batch.row_mask.shape[0]],
                                            batch.positions, [pooled[k][:p] for k in self.query_keys],
                                            self.tower.items(sequence[ITEM_KEY][1]),
                                            [pooled[k][p:] for k in self.candidate_keys],
                                            times=batch.times if self.tower.reads_times else None,
                                            lanes=batch.lanes)
        return self.loss_fn(query, candidates, batch)


class PlainBagModel(torch.nn.Module):
    """The bag tower and its loss in plain PyTorch (`PlainTowers`, as bench/train_step.py's baseline)."""

    def __init__(self, cfg: JobConfig, meta: schema.Metadata, freq: np.ndarray, negatives: Negatives,
                 sparse: bool):
        super().__init__()
        self.towers = towers.of(cfg).plain(meta, cfg, sparse=sparse)
        self.loss_fn = build_loss(cfg, negatives, freq, sequence=False, merge=False, precision="fp32")

    def forward(self, batch: TrainBatch) -> torch.Tensor:
        query, candidates = self.towers.towers(kjt_features(batch.sparse), batch.batch_size)
        return self.loss_fn(query, candidates, batch)


def plain_step(model: torch.nn.Module, impl: str, lr: float):
    """One optimizer step of a plain model: SparseAdam on the sparse item table(s) and Adam on the rest, or one
    Adam over everything."""
    if impl.startswith("sparse_adam"):
        sparse = [m.weight for m in model.modules() if getattr(m, "sparse", False)]
        ids = {id(p) for p in sparse}
        optimizers = [torch.optim.SparseAdam(sparse, lr=lr),
                      torch.optim.Adam([p for p in model.parameters() if id(p) not in ids], lr=lr, fused=True)]
        name = "SparseAdam (item table) + fused adam (rest)"
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=lr)]
        name = "adam over all parameters"

    def step(stream) -> torch.Tensor:
        loss = model(next(stream))
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        return loss.detach()

    return step, name


def project_step(cfg: JobConfig, meta: schema.Metadata, freq: np.ndarray, negatives: Negatives):
    from trainer import distributed
    from trainer.assembly import build_model

    model = build_model(cfg, distributed.init("cpu"), meta, freq, negatives)
    return (lambda stream: model.pipeline.progress(stream)["loss"]), model, \
        (f"fused {cfg.optim.sparse} (item table) + {cfg.optim.dense} (rest), TrainPipelineSparseDist, "
         f"loss.merge_duplicates={str(cfg.loss.merge_duplicates).lower()}")


def top_ops(prof, count: int = 10) -> list[dict]:
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:count]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
    return [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1000, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in rows]


def tower_impls(cfg: JobConfig, impls: list[str]) -> list[str]:
    """`impls` less the project variant whose batching is the config's own (it would repeat `torchrec`)."""
    same = "torchrec_bucketed" if cfg.loader.bucket_by_length else "torchrec_random"
    return [impl for impl in impls if impl != same]


def bucketed_batches(cfg: JobConfig, impl: str) -> bool:
    """The project batches as its config's loader would, the plain loops over random rows; a name ending in
    _random or _bucketed says otherwise."""
    name = impl.removesuffix("_bf16")
    if name.endswith(("_random", "_bucketed")):
        return name.endswith("_bucketed")
    return cfg.loader.bucket_by_length and impl.startswith("torchrec")


def batching(cfg: JobConfig) -> str:
    rows = "bucketed by length" if cfg.loader.bucket_by_length else "random rows"
    return rows + (", packed" if cfg.loader.pack_rows else "")


def step_worker(tower: str, impl: str, items: int, warmup: int, steps: int, profile: str | None) -> dict:
    torch.manual_seed(0)
    cfg = job_config(SEQUENCE_CONFIGS[tower], impl=impl)
    meta = catalogue_meta(items)
    probs = popularity(items)
    bucket = bucketed_batches(cfg, impl)
    cfg.loader.bucket_by_length = bucket
    # The pipeline reads ahead: three batches more than it trains.
    data, negatives = sequence_batches(cfg, items, probs, warmup + steps + 3, seed=0, bucket=bucket)
    freq = (probs * 1e9).astype(np.int64)
    rss_before = peak_rss_mib()
    if impl.startswith("torchrec"):
        step, _, optimizer = project_step(cfg, meta, freq, negatives)
    else:
        step, optimizer = plain_step(PlainSequenceModel(cfg, meta, freq, negatives, impl.startswith("sparse_adam")),
                                     impl, cfg.optim.dense_lr)
    stream = iter(data)
    times, positions = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(stream)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            positions.append(data[i].positions.numel())  # the pipeline trains batch i at step i
    median = statistics.median(times)
    computed, real = np.array([data[i].stack_positions() for i in range(warmup, warmup + steps)]).sum(0)
    result = {"tower": tower, "impl": impl, "items": items, "optimizer": optimizer,
              "batches": batching(cfg), "padding_share": 1 - real / computed,
              "positions_per_s": statistics.median(p / t for p, t in zip(positions, times)),
              "step_ms_median": 1000 * median, "step_ms": [1000 * t for t in times],
              "positions_per_step": statistics.mean(positions), "peak_rss_mib": peak_rss_mib(),
              "batches_rss_mib": rss_before}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler
        with profiler(activities=[ProfilerActivity.CPU]) as prof:
            step(stream)
        trace = Path(profile)
        raw = trace.with_suffix("")  # export_chrome_trace writes plain JSON; the committed trace is gzipped
        prof.export_chrome_trace(str(raw))
        trace.write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
        result["top_ops"] = top_ops(prof)
        result["trace"] = str(trace.relative_to(ROOT))
    return result


def epoch_worker(config: str, impl: str, data_path: str) -> dict:
    """One ML-1M training epoch, end to end: the loader, every step and the log lines (no evaluation)."""
    from data.loader import open_loader
    from trainer import distributed
    from trainer.checkpointing.state import LoopState
    from trainer.loop import build, seed_everything

    cfg = job_config(config, data_path, impl)
    cfg.loader.bucket_by_length = bucketed_batches(cfg, impl)
    seed_everything(cfg.seed)
    if impl.startswith("torchrec"):
        trainer = build(cfg, distributed.init("cpu"))
        examples = trainer.data.meta.counts["train_examples"]
        start = time.perf_counter()
        trainer.train_epoch(LoopState())
        optimizer = (f"fused {cfg.optim.sparse} + {cfg.optim.dense}, the project's Trainer.train_epoch, "
                     f"loss.merge_duplicates={str(cfg.loss.merge_duplicates).lower()}")
    else:
        meta = schema.Metadata.load(data_path)
        layout = towers.of(cfg).layout
        loader = open_loader(data_path, cfg.loader, "train", 0, 1, meta, layout=layout, negatives=cfg.negatives)
        model_class = PlainSequenceModel if layout.sequence else PlainBagModel
        model = model_class(cfg, meta, loader.catalogue.freq, loader.negatives, impl.startswith("sparse_adam"))
        step, optimizer = plain_step(model, impl, cfg.optim.dense_lr)
        examples = meta.counts["train_examples"]
        start = time.perf_counter()
        stream, losses, steps = loader.epoch(0), [], 0
        while True:
            try:
                losses.append(step(stream))
            except StopIteration:
                break
            steps += 1
            if steps % cfg.train.log_every == 0:
                float(torch.stack(losses).mean())
                losses = []
    seconds = time.perf_counter() - start
    return {"tower": cfg.model.query_tower, "impl": impl, "optimizer": optimizer, "seconds": seconds,
            "batches": batching(cfg),
            "examples": examples, "examples_per_s": examples / seconds, "peak_rss_mib": peak_rss_mib()}


def kept_rows(before: dict, towers: list[str], epoch_towers: list[str]) -> dict:
    """What a rerun of `towers` (and the epochs of `epoch_towers`) keeps of the results file `before`: the other
    towers' step rows, ratios and setups, the other towers' epochs, and the profile, each row dated with when it
    was measured, so that a partial rerun never drops or re-dates what it did not measure."""
    date = before.get("date") or before.get("machine", {}).get("date") or "on an unrecorded date"

    def dated(row: dict) -> dict:
        return row | {"measured": row.get("measured", date)}

    profile = before.get("profile")
    return {"results": [dated(r) for r in before.get("results", []) if r["tower"] not in towers],
            "ratios": {t: r for t, r in before.get("ratios", {}).items() if t not in towers},
            "epoch": [dated(r) for r in before.get("epoch", []) if r["tower"] not in epoch_towers],
            "profile": dated(profile) if profile else None,
            "setup": {t: r for t, r in before.get("setup", {}).get("towers", {}).items() if t not in towers}}


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.sequence_step", *args], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_row(done: list[dict], key: str) -> dict:
    values = [r[key] for r in done]
    row = {k: v for k, v in done[0].items() if k not in ("step_ms", "top_ops", "trace", "batches_rss_mib")}
    row.update({key: statistics.median(values), f"{key}_runs": values,
                "peak_rss_mib": max(r["peak_rss_mib"] for r in done)})
    if "seconds" in done[0]:  # an epoch: its wall time is the median run's too, not the first's
        row.update({"seconds": statistics.median(r["seconds"] for r in done),
                    "seconds_runs": [r["seconds"] for r in done]})
    if "step_ms_median" in done[0]:
        row["step_ms_median"] = statistics.median(r["step_ms_median"] for r in done)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", nargs="+", default=list(SEQUENCE_CONFIGS), choices=list(SEQUENCE_CONFIGS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--epoch", metavar="PREPARED", help="also time the ML-1M epoch end to end (every tower)")
    parser.add_argument("--epoch-repeats", type=int, default=3)
    parser.add_argument("--epoch-towers", nargs="+", default=list(EPOCH_CONFIGS), choices=list(EPOCH_CONFIGS))
    parser.add_argument("--profile", action="store_true", help="Chrome trace of one project step at 10^6 items")
    parser.add_argument("--out", default=str(RESULTS / "sequence_step.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tower", help=argparse.SUPPRESS)  # a worker's tower (an epoch worker: its config)
    parser.add_argument("--trace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (epoch_worker(args.tower, args.worker, args.epoch) if args.epoch
                  else step_worker(args.tower, args.worker, args.items, args.warmup, args.steps, args.trace))
        print(json.dumps(result))
        return
    rows, epochs, profile = [], [], None
    for tower in args.towers:
        impls = tower_impls(job_config(SEQUENCE_CONFIGS[tower]), args.impls)
        for items in args.sizes:
            runs: dict[str, list[dict]] = {impl: [] for impl in impls}
            for _ in range(args.repeats):
                for impl in impls:  # interleaved, so drift on the machine hits every implementation alike
                    warmup, steps = args.warmup, args.steps
                    if impl == "dense_adam" and items >= 10**7:  # rewrites 10^7 rows and two moments a step
                        warmup, steps = min(warmup, 1), min(steps, 3)
                    runs[impl].append(run(["--worker", impl, "--tower", tower, "--items", str(items),
                                           "--warmup", str(warmup), "--steps", str(steps)]))
            for impl, done in runs.items():
                rows.append(median_row(done, "positions_per_s"))
                print(f"{tower:<12} {items:>10,} items  {impl:<20} {rows[-1]['positions_per_s']:>9,.0f} positions/s "
                      f"(runs {', '.join(f'{v:,.0f}' for v in rows[-1]['positions_per_s_runs'])}), padding "
                      f"{rows[-1]['padding_share']:.0%}, peak RSS {rows[-1]['peak_rss_mib']:8,.0f} MiB", flush=True)
    if args.profile:
        profile = run(["--worker", "torchrec", "--tower", args.towers[0], "--items", str(10**6),
                       "--warmup", str(args.warmup), "--steps", "1", "--trace",
                       str(RESULTS / "sequence_step_trace.json.gz")])
        profile = {"tower": args.towers[0], "items": 10**6, "trace": profile["trace"], "top_ops": profile["top_ops"]}
    if args.epoch:
        for tower in args.epoch_towers:
            config = EPOCH_CONFIGS[tower]
            impls = (tower_impls(job_config(config), args.impls) if tower in SEQUENCE_CONFIGS
                     else [impl for impl in args.impls if not impl.endswith(("_random", "_bucketed"))])
            runs = {impl: [] for impl in impls}
            for _ in range(args.epoch_repeats):
                for impl in runs:
                    runs[impl].append(run(["--worker", impl, "--tower", config, "--epoch", args.epoch]))
            for impl, done in runs.items():
                epochs.append(median_row(done, "examples_per_s"))
                print(f"ML-1M epoch  {tower:<12} {impl:<20} {epochs[-1]['examples_per_s']:>9,.0f} examples/s "
                      f"({statistics.median(r['seconds'] for r in done):.1f} s)", flush=True)
    speed = {(r["tower"], r["impl"], r["items"]): r["positions_per_s"] for r in rows}
    ratios = {tower: {str(items): {f"torchrec_over_{impl}": speed[tower, "torchrec", items] / speed[tower, impl, items]
                                   for impl in args.impls if impl != "torchrec" and (tower, impl, items) in speed}
                      for items in args.sizes} for tower in args.towers}
    kept = kept_rows(json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}, args.towers,
                     args.epoch_towers if args.epoch else [])
    rows += kept["results"]
    ratios.update(kept["ratios"])
    epochs += kept["epoch"]
    profile = profile or kept["profile"]
    setup = kept["setup"]
    for tower in args.towers:
        cfg = job_config(SEQUENCE_CONFIGS[tower])
        setup[tower] = {"config": SEQUENCE_CONFIGS[tower], "batch_size": cfg.loader.batch_size,
                        "max_sequence_length": cfg.loader.max_sequence_length,
                        "bucket_by_length": cfg.loader.bucket_by_length, "pack_rows": cfg.loader.pack_rows,
                        "negatives": cfg.negatives.num_sampled, "sampler": cfg.negatives.kind,
                        "item_dim": cfg.model.item_dim, "blocks": cfg.model.tower.blocks,
                        "hidden_dims": cfg.model.hidden_dims, "history_bags": cfg.loader.history_bags}
    result = {"machine": machine(),
              "setup": {"towers": setup, "popularity": "zipf(1.0)", "warmup_steps": args.warmup, "steps": args.steps,
                        "repeats": args.repeats, "epoch_repeats": args.epoch_repeats if args.epoch else 0,
                        "timing": "per process: median positions/s over the timed steps; reported: the median "
                                  "over `repeats` fresh processes, run interleaved across implementations"},
              "results": rows, "ratios": ratios, "epoch": epochs, "profile": profile}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
