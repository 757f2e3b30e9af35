"""Do the committed sequence defaults generalise beyond ML-1M's long histories? Two short-history proxies
of the held-out e-commerce sets (5 to 50 events per user, an attribute JSON), each prepared from a
sequence file the way a user would (`python -m data.prepare sequences FILE --item-attributes JSON`), then
trained with `configs/sequences.yaml` (transformer) and with `configs/ml1m.yaml` (bags), only `data.path`
changed.

    python -m bench.short_history [--ml1m ../shared/datasets/ml-1m] [--towers bags transformer]

- `ml1m-short`: every ML-1M user cut to their last n events, n = 5 + Geometric(1/6) capped at 50 (mean
  about 10, like Amazon Beauty's 8.9), genres as attributes;
- `synthetic-short`: the synthetic generator with 20,000 users, 12,000 items and 9 events on average.

Writes bench/results/short_history.json (test metrics, epochs and wall time per run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import machine, tower_configs

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ("configs/ml1m.yaml", "configs/sequences.yaml")  # one per query tower

CONFIGS = tower_configs(COMMITTED)
REPORTED = ("hr@10", "ndcg@10", "hr@50", "hr@200", "mrr", "coverage@10")


def write_ml1m_short(ml1m: Path, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A sequence file of each ML-1M user's last n events and a genre attribute JSON."""
    rng = np.random.default_rng(seed)
    lines = []
    with gzip.open(ml1m / "sequences.txt.gz", "rt") as f:
        for line in f:
            user, *items = line.split()
            n = min(len(items), 50, 5 + int(rng.geometric(1 / 6)) - 1)
            lines.append(" ".join([user, *items[-n:]]))
    sequences = out / "ml1m_short.txt"
    sequences.write_text("\n".join(lines) + "\n")
    genres = {}
    for line in (ml1m / "movies.dat").read_text(encoding="latin-1").splitlines():
        movie, _, names = line.split("::")
        genres[movie] = names.split("|")
    attributes = out / "ml1m_short_attributes.json"
    attributes.write_text(json.dumps(genres))
    return sequences, attributes


def prepare(args: list[str], out: Path) -> None:
    subprocess.run([sys.executable, "-m", "data.prepare", *args, "--out", str(out), "--overwrite"], cwd=ROOT,
                   check=True)


def train(config: str, data: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "summary.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "trainer", "--config", config, f"data.path={data}",
                        "--summary", str(summary)], cwd=ROOT, check=True)
        result = json.loads(summary.read_text())
    return {"best_epoch": result["best_epoch"], "epochs_run": len(result["history"]),
            "seconds": round(time.perf_counter() - start, 1), "run_id": result.get("run_id"),
            "test": {k: round(result["test"][k], 4) for k in REPORTED},
            "popularity_test": {k: round(result["popularity_test"][k], 4) for k in REPORTED}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ml1m", default=str(ROOT.parent / "shared" / "datasets" / "ml-1m"))
    parser.add_argument("--prepared", default=str(ROOT / "prepared"))
    parser.add_argument("--towers", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    parser.add_argument("--datasets", nargs="+", choices=["ml1m-short", "synthetic-short"],
                        default=["ml1m-short", "synthetic-short"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "short_history.json"))
    args = parser.parse_args()
    prepared, out = Path(args.prepared), Path(args.out)
    output = json.loads(out.read_text()) if out.exists() else {}
    output["machine"] = machine()
    results = output.setdefault("datasets", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            data = prepared / name
            if not (data / "metadata.json").exists():
                if name == "ml1m-short":
                    sequences, attributes = write_ml1m_short(Path(args.ml1m), Path(tmp))
                    prepare(["sequences", str(sequences), "--item-attributes", str(attributes)], data)
                else:
                    prepare(["synthetic", "--users", "20000", "--items", "12000", "--mean-events", "9"], data)
            meta = json.loads((data / "metadata.json").read_text())
            entry = results.setdefault(name, {})
            entry["data"] = {"users": meta["num_users"], "items": meta["num_items"],
                             "train_examples": meta["counts"]["train_examples"]}
            for tower in args.towers:
                entry[tower] = {"config": CONFIGS[tower], **train(CONFIGS[tower], data)}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps({n: {t: r[t]["test"] for t in CONFIGS if t in r} for n, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
