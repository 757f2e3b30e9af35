"""Top-K items for a history, or the neighbours of an item, from an export (no TorchRec needed).

    python -m serving.recommend --run <MLflow run id | export dir or URI> --history "1193,661,914" -k 20 [--mmr 0.3]
    python -m serving.recommend --run <MLflow run id | export dir or URI> --similar 1193 -k 10

(`python -m trainer.recommend` is the same command.) History ids are raw ids as in the source data,
oldest first. A model that reads event times (HSTU trained on data with timestamps) also needs `--times`, one
unix time in seconds per history id, and takes the query's time from `--at` (default: now). Items already in
the history are not recommended, unless the model was trained with eval.filter_seen=false (repeats are the
point). Unknown ids and feature values are reported on
stderr and skipped. `--mmr D` re-ranks the top `--candidates` by maximal marginal relevance: each
pick maximises
(1 - D) * score - D * (highest cosine to an item already picked), so D = 0 is the plain ranking.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np

from data.schema import PAD_ID
from serving import index as ann
from serving.console import quiet
from serving.format import USER_MAP
from serving.model import ExportedModel
from serving.runs import resolve


@dataclass
class Ranked:
    raw_id: str
    title: str | None
    score: float


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Greedy maximal-marginal-relevance order of the first k picks (indices into `relevance`)."""
    chosen: list[int] = []
    left = np.ones(len(relevance), dtype=bool)
    redundancy = np.full(len(relevance), -np.inf)
    for _ in range(min(k, len(relevance))):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain = np.where(left, (1 - diversity) * relevance - diversity * penalty, -np.inf)
        pick = int(np.argmax(gain))
        chosen.append(pick)
        left[pick] = False
        redundancy = np.maximum(redundancy, vectors @ vectors[pick])
    return np.array(chosen, dtype=np.int64)


def parse_features(text: str) -> dict[str, list[str]]:
    """"u_gender=F,u_age=25,i_tags=a|b" -> {"u_gender": ["F"], "u_age": ["25"], "i_tags": ["a", "b"]}."""
    out: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"--user-features: '{part}' must look like name=value")
        out[name.strip()] = [v.strip() for v in value.split("|") if v.strip()]
    return out


def parse_times(text: str | None) -> list[int] | None:
    """"1700000000,1700003600" -> [1700000000, 1700003600]; None stays None."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if not p.lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"--times: unix times in whole seconds, got '{bad[0]}'")
    return [int(p) for p in parts]


class UnknownItems(ValueError):
    """Every item id the command was given is unknown: the answer would be a popularity list or nothing."""


class Recommender:
    def __init__(self, model: ExportedModel):
        self.model = model
        self.notes: list[str] = []

    def items(self, raw_ids: list[str]) -> list[int]:
        known = [r for r in raw_ids if r in self.model.row_of_raw]
        unknown = [r for r in raw_ids if r not in self.model.row_of_raw]
        if unknown:
            self.notes.append(f"unknown item ids, skipped: {', '.join(unknown)}")
        return [int(self.model.item_ids[self.model.row_of_raw[r]]) for r in known]

    def examples(self, count: int = 3) -> str:
        """The catalogue size and a few of its raw ids, for an error about unknown ones."""
        return f"{len(self.model.raw_ids)} items, e.g. {', '.join(self.model.raw_ids[:count])}"

    def known_history(self, history: list[str]) -> None:
        """A history given on the command line must hold at least one known id (an empty one is a cold start)."""
        if history and not any(r in self.model.row_of_raw for r in history):
            raise UnknownItems(f"--history: none of its item ids is in the catalogue: {', '.join(history[:5])}"
                               f"{' ...' if len(history) > 5 else ''} (raw ids as in the source data; "
                               f"{self.examples()})")

    def features(self, raw: dict[str, list[str]]) -> dict[str, list[int]]:
        spec = self.model.features
        unknown_names = sorted(set(raw) - set(spec))
        if unknown_names:
            raise ValueError(f"--user-features: the model has no feature {', '.join(unknown_names)} "
                             f"(it has: {', '.join(spec) or 'none'})")
        out = {}
        for name, values in raw.items():
            mapping = self.model.id_maps.get(name, {})
            missing = [v for v in values if v not in mapping]
            if missing:
                self.notes.append(f"unknown values of {name}, skipped: {', '.join(missing)}")
            out[name] = [mapping[v] for v in values if v in mapping]
        absent = [name for name in spec if name not in raw]
        if absent:
            self.notes.append(f"features not given (the padding id is used): {', '.join(absent)}")
        return out

    def user(self, raw: str | None) -> int:
        if raw is None:
            return PAD_ID
        if not self.model.layout.use_user_id:
            self.notes.append("--user ignored: this model has no user-id table")
            return PAD_ID
        mapping = self.model.id_maps.get(USER_MAP, {})
        if raw not in mapping:
            self.notes.append(f"unknown user id {raw}: the padding id is used")
        return mapping.get(raw, PAD_ID)

    def rank(self, query: np.ndarray, exclude: set[int], k: int, diversity: float, candidates: int) -> list[Ranked]:
        pool = max(k, candidates) if diversity > 0 else k
        scores, ids = ann.search(self.model.index, query[None, :], pool + len(exclude))
        keep = [(s, int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in exclude][:pool]
        rows = np.array([self.model.row_of_id[i] for _, i in keep], dtype=np.int64)
        relevance = np.array([s for s, _ in keep], dtype=np.float32)
        order = mmr(relevance, self.model.embeddings[rows], k, diversity) if diversity > 0 else np.arange(len(rows))[:k]
        return [Ranked(self.model.raw_ids[rows[o]], self.model.titles[rows[o]], float(relevance[o])) for o in order]

    def query_times(self, history: list[str], times: list[int] | None, at: int | None) -> list[int] | None:
        """What the model reads of the times: one per known history id, then the query's (`at`, default now)."""
        if not self.model.reads_times:
            if times is not None:
                self.notes.append("--times ignored: this model reads no event times")
            return None
        if times is None:
            raise ValueError("--times: this model reads event times (HSTU's time-gap bias): give one unix time in "
                             "seconds per --history id")
        if len(times) != len(history):
            raise ValueError(f"--times: one per --history id ({len(history)}), got {len(times)}")
        known = [int(t) for raw, t in zip(history, times) if raw in self.model.row_of_raw]
        return known + [int(time.time()) if at is None else int(at)]

    def recommend(self, history: list[str], features: dict[str, list[str]], user: str | None = None, k: int = 20,
                  diversity: float = 0.0, candidates: int = 200, times: list[int] | None = None,
                  at: int | None = None) -> list[Ranked]:
        """Top k for a history (raw ids, oldest first); `times` and `at` as `query_times` reads them."""
        seen = self.items(history)
        query = self.model.encode(seen, self.features(features), self.user(user), self.query_times(history, times, at))
        exclude = set(seen) if self.model.manifest.filter_seen else set()
        return self.rank(query, exclude, k, diversity, candidates)

    def similar(self, raw_id: str, k: int = 20, diversity: float = 0.0, candidates: int = 200) -> list[Ranked]:
        if raw_id not in self.model.row_of_raw:
            raise UnknownItems(f"--similar: item id {raw_id!r} is not in the catalogue ({self.examples()})")
        ids = self.items([raw_id])
        vector = self.model.embeddings[self.model.row_of_id[ids[0]]]
        return self.rank(vector, set(ids), k, diversity, candidates)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an MLflow run id, or an export directory (a local path or a "
                                                     "URI such as s3://bucket/exports/<run id>)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--history", help="comma-separated raw item ids, oldest first")
    what.add_argument("--similar", help="a raw item id: its nearest items by embedding")
    parser.add_argument("--user-features", default="", help="name=value,... for user and context features "
                                                            "(list features: name=a|b)")
    parser.add_argument("--user", help="raw user id, for models trained with loader.use_user_id")
    parser.add_argument("--times", help="comma-separated unix times in seconds, one per --history id (models that "
                                        "read event times: HSTU on data with timestamps)")
    parser.add_argument("--at", type=int, help="the query's unix time in seconds, with --times (default: now)")
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--mmr", type=float, default=0.0, help="diversity weight D in [0, 1] (0: off)")
    parser.add_argument("--candidates", type=int, default=200, help="how many top items MMR re-ranks")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
                                               "sqlite:///mlflow.db)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--verbose", action="store_true", help="keep the libraries' known warnings and progress bars")
    args = parser.parse_args(argv)
    quiet(args.verbose)
    if not 0.0 <= args.mmr <= 1.0 or args.k < 1 or args.candidates < 1:
        parser.error("--mmr must be in [0, 1]; -k and --candidates must be >= 1")
    try:
        recommender = Recommender(ExportedModel(resolve(args.run, args.tracking_uri)))
        if args.similar is not None:
            ranked = recommender.similar(args.similar.strip(), args.k, args.mmr, args.candidates)
        else:
            history = [h.strip() for h in args.history.split(",") if h.strip()]
            recommender.known_history(history)
            ranked = recommender.recommend(history, parse_features(args.user_features), args.user, args.k,
                                           args.mmr, args.candidates, parse_times(args.times), args.at)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in recommender.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.__dict__ for r in ranked], indent=2))
    else:
        for position, r in enumerate(ranked, 1):
            print(f"{position:>3}  {r.raw_id:>10}  {r.score:+.4f}  {r.title or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
