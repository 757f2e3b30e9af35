"""The docs' benchmark tables, generated from the results JSON, so no number is copied by hand.

    .venv/bin/python -m bench.tables train_step | sequence_step | prepare   # print one
    .venv/bin/python -m bench.tables --write                                  # rewrite every page (make docs)
    .venv/bin/python -m bench.tables --check                                  # exit 1 naming stale pages

A page marks each generated table with `<!-- table: NAME -->` ... `<!-- /table -->`;
tests/architecture/test_docs.py fails when a committed page differs from what its JSON generates.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- table: (\w+) -->\n)(.*?)(<!-- /table -->)", re.S)
NAMES = {"torchrec": "project", "torchrec_random": "project, random rows",
         "torchrec_bucketed": "project, bucketed rows", "torchrec_unmerged": "project unmerged",
         "torchrec_bf16": "project, bf16", "torchrec_bucketed_bf16": "project, bucketed rows, bf16",
         "torchrec_padded": "project, padded rows", "torchrec_padded_bf16": "project, padded rows, bf16",
         "torchrec_padded_512": "project, padded rows, MLPs [512]",
         "sparse_adam": "SparseAdam", "sparse_adam_bucketed": "SparseAdam, bucketed rows", "dense_adam": "dense Adam"}


def step_table(result: dict, unit: str) -> list[str]:
    """One table per tower (the sequence benchmark's rows name theirs), catalogue sizes down, implementations
    across."""
    lines: list[str] = []
    for tower in dict.fromkeys(r.get("tower") for r in result["results"]):
        results = [r for r in result["results"] if r.get("tower") == tower]
        impls = list(dict.fromkeys(r["impl"] for r in results))
        rows = {(r["impl"], r["items"]): r for r in results}
        sizes = sorted({r["items"] for r in results})
        others = [i for i in impls if i != "torchrec"]
        # train.precision=bf16 rows (bench/sequence_step.py) against the float32 plain baseline too
        mixed = [i for i in impls if i.endswith("_bf16") and "sparse_adam" in impls]
        padding = "padding_share" in results[0]
        when = f" (measured {results[0]['measured']})" if "measured" in results[0] else ""
        head = ([f"{tower}{when}: items" if tower else "items"] + [f"{NAMES[i]} ({unit})" for i in impls]
                + [f"project / {NAMES[i]}" for i in others] + [f"{NAMES[i]} / SparseAdam" for i in mixed]
                + (["padding (" + " / ".join(NAMES[i] for i in impls) + ")"] if padding else [])
                + ["peak RSS MiB (" + " / ".join(NAMES[i] for i in impls) + ")"])
        lines += ([""] if lines else []) + ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        key = "examples_per_s" if unit == "examples/s" else "positions_per_s"
        for n in sizes:
            speed = [rows[i, n][key] for i in impls]
            ratios = ([rows["torchrec", n][key] / rows[i, n][key] for i in others]
                      + [rows[i, n][key] / rows["sparse_adam", n][key] for i in mixed])
            pads = [" / ".join(f"{rows[i, n]['padding_share']:.0%}" for i in impls)] if padding else []
            rss = " / ".join(f"{rows[i, n]['peak_rss_mib']:,.0f}" for i in impls)
            lines.append("| " + " | ".join([f"{n:,}"] + [f"{v:,.0f}" for v in speed]
                                           + [f"x{r:.2f}" for r in ratios] + pads + [rss]) + " |")
    return lines


def epoch_table(result: dict) -> list[str]:
    lines = ["| ML-1M epoch | implementation | batches | seconds | examples/s | project / this | peak RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    project = {r["tower"]: r["examples_per_s"] for r in result["epoch"] if r["impl"] == "torchrec"}
    for r in result["epoch"]:
        ratio = project[r["tower"]] / r["examples_per_s"]
        when = f" (measured {r['measured']})" if "measured" in r else ""
        lines.append(f"| {r['tower']}{when} | {NAMES[r['impl']]} | {r.get('batches', 'random rows')} | "
                     f"{r['seconds']:,.1f} | {r['examples_per_s']:,.0f} | x{ratio:.2f} | {r['peak_rss_mib']:,.0f} |")
    return lines


def profile_table(result: dict) -> list[str]:
    profile = result["profile"]
    tower = f"{profile['tower']}, " if profile.get("tower") else ""
    tower += f"measured {profile['measured']}, " if profile.get("measured") else ""
    lines = [f"| op (one project step, {tower}{profile['items']:,} items) | self CPU ms | share | calls |",
             "| --- | --- | --- | --- |"]
    for op in profile["top_ops"]:
        lines.append(f"| `{op['op']}` | {op['self_cpu_ms']:.1f} | {op['share']:.1%} | {op['calls']} |")
    return lines


ENGINES = {"pandas": "pandas (before)", "duckdb": "embedded (DuckDB)", "spark": "Spark local[*]"}


def prepare_table(result: dict) -> list[str]:
    """Wall time, events/s and peak RSS of the process tree per engine and log size; then the targets."""
    lines = ["| events | engine | runs | wall s (median) | events/s | peak RSS MiB (median) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, row in sorted(result["results"].items(), key=lambda kv: (int(kv[0].split("/")[1]), kv[0])):
        engine, events = key.split("/")
        if "skipped" in row:
            lines.append(f"| {int(events):,} | {ENGINES[engine]} | - | not run: {row['skipped']} | | |")
        elif row["median_seconds"] is None:
            error = (row.get("errors") or [""])[0].strip().splitlines()
            after = f" after {row['failed_seconds'][0]:,.0f} s" if row.get("failed_seconds") else ""
            lines.append(f"| {int(events):,} | {ENGINES[engine]} | {row['runs']} | failed{after}: "
                         f"`{error[-1] if error else 'no message'}` | | |")
        else:
            lines.append(f"| {int(events):,} | {ENGINES[engine]} | {row['ok']} | {row['median_seconds']:,.1f} | "
                         f"{row['events_per_s']:,.0f} | {row['median_peak_rss_mib']:,.0f} |")
    lines += ["", "| target | value | met |", "| --- | --- | --- |"]
    for name, target in result.get("targets", {}).items():
        lines.append(f"| {name.replace('_', ' ')} {target['target']} | {target['value']:.2f} | "
                     f"{'yes' if target['met'] else 'no'} |")
    loader = result.get("loader")
    if loader:
        lines += ["", "| loader, one epoch (median) | examples/s |", "| --- | --- |",
                  f"| local disk | {loader['local_median']:,.0f} |",
                  f"| local S3 server (moto, over HTTP) | {loader['s3_median']:,.0f} |"]
    return lines


def short_history_table(result: dict) -> list[str]:
    """bench/short_history.py: each dataset's recipes side by side, test means over seeds."""
    lines = ["| dataset | recipe | seeds | test HR@10 | test NDCG@10 | HR@200 | best epoch | minutes a run (max) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in result["datasets"].items():
        for recipe in ("bag-tower", "sequences-previous", "sequences", "ml1m-hstu-config", "ml1m-hstu-positions"):
            if recipe not in entry:
                continue
            s = entry[recipe]["summary"]
            mean, std = s["test_mean"], s["test_std"]
            lines.append(f"| {name} | {recipe} | {len(s['seeds'])} | {mean['hr@10']:.4f} ± {std['hr@10']:.4f} | "
                         f"{mean['ndcg@10']:.4f} ± {std['ndcg@10']:.4f} | {mean['hr@200']:.4f} | "
                         f"{s['best_epoch_mean']:g} | {s['seconds_mean'] / 60:.1f} ({s['seconds_max'] / 60:.1f}) |")
    return lines


def search_table(result: dict) -> list[str]:
    """The one-seed recipe search on the development set (bench/results/short_history_search.json)."""
    lines = ["| run | overrides | epochs seen | best validation HR@10 / NDCG@10 (epoch) | train s / epoch |",
             "| --- | --- | --- | --- | --- |"]
    for run in result["runs"]:
        best = run["best_valid"]
        overrides = run.get("change") or " ".join(f"`{o}`" for o in run["overrides"]) or run["config"]
        seconds = run["train_seconds_per_epoch_median"]
        lines.append(f"| {run['name']} | {overrides} | {run['epochs_seen']} | {best['hr@10']:.4f} / "
                     f"{best['ndcg@10']:.4f} ({best['epoch']}) | {'' if seconds is None else seconds} |")
    return lines


def evaluation_table(result: dict) -> list[str]:
    """bench/evaluation.py: one validation pass per tower, queries in file order and by length."""
    lines = ["| tower | queries in | seconds (median) | padding the stack computed | HR@10 / NDCG@10 (untrained) | "
             "speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["results"]:
        speedup = f"x{result['speedup'][r['tower']]:.2f}" if r["order"] == "length" else ""
        lines.append(f"| {r['tower']} | {'file order' if r['order'] == 'file' else 'length order'} | "
                     f"{r['seconds']:.1f} | {r['padding_share']:.0%} | {r['metrics']['hr@10']:.4f} / "
                     f"{r['metrics']['ndcg@10']:.4f} | {speedup} |")
    return lines


def provenance(result: dict) -> str:
    """When and where the numbers were measured: the results' date and machine."""
    m = result.get("machine", {})
    date = result.get("date") or m.get("date") or "on an unrecorded date"
    device = m.get("gpu") or f"{m.get('cpus', '?')} CPU cores, no GPU"
    return f"Measured {date} on {device} (torch {m.get('torch', '?')}), `bench/results/` JSON."


def table(name: str) -> list[str]:
    result = json.loads((RESULTS / f"{name}.json").read_text())
    if name == "prepare":
        lines = prepare_table(result)
    elif name == "train_step":
        lines = step_table(result, "examples/s")
    elif name == "short_history":
        lines = short_history_table(result)
    elif name == "short_history_search":
        lines = search_table(result)
    elif name == "evaluation":
        lines = evaluation_table(result)
    else:
        lines = step_table(result, "positions/s")
        if result.get("epoch"):
            lines += [""] + epoch_table(result)
        if result.get("profile"):
            lines += [""] + profile_table(result)
    return lines + ["", provenance(result)]


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md"] + sorted((root / "docs").glob("*.md"))


def regenerated(text: str) -> str:
    """The page with each marked table replaced by what its JSON generates now."""
    return BLOCK.sub(lambda m: m.group(1) + "\n".join(table(m.group(2))) + "\n" + m.group(4), text)


def stale(root: Path = ROOT) -> list[str]:
    """Pages whose generated tables differ from their JSON."""
    return [str(page.relative_to(root)) for page in pages(root) if regenerated(page.read_text()) != page.read_text()]


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--write":
        for page in pages():
            page.write_text(regenerated(page.read_text()))
        return 0
    if argv and argv[0] == "--check":
        out = stale()
        if out:
            print(f"stale benchmark tables in {', '.join(out)}: run `make docs`", file=sys.stderr)
        return 1 if out else 0
    print("\n".join(table(argv[0] if argv else "train_step")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
