"""`python -m data.prepare SOURCE ... --out URI [--engine duckdb|spark]`: the command line of prepare.

    python -m data.prepare movielens ../shared/datasets/ml-1m --out prepared/ml-1m
    python -m data.prepare interactions events.parquet --user-col u --item-col i --time-col t --out prepared/x
    python -m data.prepare interactions s3://bucket/logs/ ... --out s3://bucket/prepared/x
    python -m data.prepare sequences seq.txt.gz [--item-attributes attrs.json] --out prepared/seq
    python -m data.prepare synthetic --out prepared/synthetic [--users 20000 --items 5000]
    python -m data.prepare interactions s3://bucket/logs/ ... --engine spark --master yarn --out s3://...

Inputs and `--out` are URIs (local paths, file://, s3://, gs://, hdfs://); a raw input may be one file or a
directory of Parquet/CSV parts. Endpoints and credentials come from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...). Nothing is written until the dataset is complete: a failed run leaves nothing that
looks prepared.
"""

from __future__ import annotations

import argparse
import sys

from data import schema
from data.errors import DataError
from data.prepare import DEFAULT_MEMORY, ENGINES, check_output, make_engine, prepare
from data.sources import RawSource, read_interactions, read_movielens, read_sequences, with_side_tables
from data.splits import SplitConfig
from storage import StorageError, location


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


def report(meta: schema.Metadata, out: str) -> list[str]:
    """What prepare did, in the words a user checks it by: counts, what was dropped, and repeats."""
    counts = meta.counts
    lines = [f"prepared {out}: {meta.num_users} users, {meta.num_items} items, {counts['train_examples']} "
             f"training examples, {counts['valid_rows']} validation and {counts['test_rows']} test queries"]
    if counts["duplicate_rows"]:
        lines.append(f"dropped {counts['duplicate_rows']} duplicate rows (the same user, item and time)")
    lines.append(f"filters (--min-user-events {meta.filters['min_user_events']}, --min-item-events "
                 f"{meta.filters['min_item_events']}) dropped {counts['dropped_users']} users, "
                 f"{counts['dropped_items']} items and {counts['dropped_events']} events")
    valid, test = meta.repeats["valid"], meta.repeats["test"]
    shares = [f"{percent(r['repeat_targets'], r['targets'])} of {name} targets ({r['repeat_targets']} of "
              f"{r['targets']})" for name, r in (("validation", valid), ("test", test))]
    lines.append(f"repeats: {shares[0]} and {shares[1]} were consumed earlier by the same user")
    if valid["repeat_targets"] or test["repeat_targets"]:
        lines.append(f"  with eval.filter_seen=true (the default) such targets cannot be ranked, so they are left "
                     f"out: {valid['queries_all_repeat']} validation and {test['queries_all_repeat']} test queries "
                     f"have no other target and are not evaluated. For domains where repeats are the point "
                     f"(music, grocery), train with eval.filter_seen=false")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    movielens = sub.add_parser("movielens", help="a MovieLens directory (100K, 1M, 10M, 20M, 25M, latest, "
                                                 "or the sequence copy of 1M)")
    movielens.add_argument("path")
    inter = sub.add_parser("interactions", help="a generic CSV/Parquet interactions table, or a directory of parts")
    inter.add_argument("path")
    inter.add_argument("--user-col", default="user")
    inter.add_argument("--item-col", default="item")
    inter.add_argument("--time-col", default="timestamp")
    inter.add_argument("--rating-col")
    inter.add_argument("--item-features", help="CSV/Parquet keyed by --item-col; other columns are features")
    inter.add_argument("--user-features", help="CSV/Parquet keyed by --user-col; other columns are features")
    inter.add_argument("--feature-sep", default="|", help="separator of multi-valued CSV features")
    inter.add_argument("--encoding", default="utf-8", help="text encoding of CSV files (e.g. latin-1)")
    seq = sub.add_parser("sequences", help="a 'user item item ...' file, optionally compressed")
    seq.add_argument("path")
    seq.add_argument("--item-attributes", help='JSON {"item": [attribute, ...]}')
    seq.add_argument("--movies", help="MovieLens movies.dat for titles and genres")
    seq.add_argument("--users", help="MovieLens users.dat for user features")
    seq.add_argument("--string-ids", action="store_true", help="ids are arbitrary tokens, not integers")
    synth = sub.add_parser("synthetic", help="the generated default dataset (see data/synthetic.py)")
    synth.add_argument("--users", type=int, default=None)
    synth.add_argument("--items", type=int, default=None)
    synth.add_argument("--mean-events", type=float, default=None)
    synth.add_argument("--allow-repeats", action="store_true",
                       help="users may consume an item again (by default each user's items are distinct)")
    for p in (movielens, inter, seq, synth):
        p.add_argument("--out", required=True, help="where to write: a local path or a URI (s3://, gs://, ...)")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--protocol", choices=["leave_one_out", "time"], default="leave_one_out")
        p.add_argument("--max-history", type=int, default=SplitConfig.max_history)
        p.add_argument("--min-user-events", type=int, default=SplitConfig.min_user_events)
        p.add_argument("--min-item-events", type=int, default=SplitConfig.min_item_events)
        p.add_argument("--min-positive-rating", type=float)
        p.add_argument("--min-relevant-rating", type=float)
        p.add_argument("--valid-fraction", type=float, default=SplitConfig.valid_fraction)
        p.add_argument("--test-fraction", type=float, default=SplitConfig.test_fraction)
        p.add_argument("--keep-cold-users", action="store_true")
        p.add_argument("--keep-cold-items", action="store_true")
        p.add_argument("--engine", choices=ENGINES, default="duckdb",
                       help="duckdb: embedded, out of core (default); spark: Apache Spark (pip install '.[spark]')")
        p.add_argument("--memory-limit", default="",
                       help=f"duckdb: memory before it spills to disk (default {DEFAULT_MEMORY})")
        p.add_argument("--threads", type=int, default=0, help="duckdb: threads (default: every core)")
        p.add_argument("--temp-dir", default="", help="duckdb: where it spills (default: the system's temp dir)")
        p.add_argument("--master", default="", help="spark: local[*] (default), spark://host:port, yarn, k8s://...; "
                                                     "spark-submit's own master when run by spark-submit")
        p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                       help="spark: a Spark setting, e.g. spark.executor.memory=8g (repeatable)")
    return parser.parse_args(argv)


def load_source(args: argparse.Namespace) -> RawSource:
    if args.source == "movielens":
        return read_movielens(args.path)
    if args.source == "interactions":
        return read_interactions(args.path, args.user_col, args.item_col, args.time_col, args.rating_col,
                                 args.item_features, args.user_features, feature_sep=args.feature_sep,
                                 encoding=args.encoding)
    if args.source == "sequences":
        source = read_sequences(args.path, args.item_attributes, string_ids=args.string_ids)
        return with_side_tables(source, location(args.movies) if args.movies else None,
                                location(args.users) if args.users else None, required=True)
    from data.synthetic import SyntheticConfig, generate

    overrides = {k: v for k, v in (("num_users", args.users), ("num_items", args.items),
                                   ("mean_events", args.mean_events)) if v is not None}
    return generate(SyntheticConfig(seed=args.seed, allow_repeats=args.allow_repeats, **overrides))


def spark_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError("--spark-conf", None, "KEY=VALUE", repr(pair))
        settings[key.strip()] = value.strip()
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    engine = None
    try:
        cfg = SplitConfig(protocol=args.protocol, max_history=args.max_history,
                          min_user_events=args.min_user_events, min_item_events=args.min_item_events,
                          min_positive_rating=args.min_positive_rating,
                          min_relevant_rating=args.min_relevant_rating, valid_fraction=args.valid_fraction,
                          test_fraction=args.test_fraction, keep_cold_users=args.keep_cold_users,
                          keep_cold_items=args.keep_cold_items)
        out = location(args.out)
        check_output(out, args.overwrite)
        source = load_source(args)
        engine = make_engine(args.engine, args.master, args.memory_limit, args.threads, args.temp_dir,
                             spark_settings(args.spark_conf))
        info = {"kind": args.source, "path": getattr(args, "path", None), "seed": args.seed, "engine": args.engine}
        metadata = prepare(source, cfg, out, seed=args.seed, overwrite=args.overwrite, engine=engine, info=info)
    except (DataError, StorageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.close()
    print("\n".join(report(metadata, args.out)))
    return 0
