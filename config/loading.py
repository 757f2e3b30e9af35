"""Strict loading: YAML file plus `section.key=value` overrides -> `JobConfig`, and back to text."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import yaml

from config.job import ConfigError, JobConfig, LoaderConfig

NOT_KEYS = {LoaderConfig: {"seed"}}  # fields a config file may not set (copied from elsewhere)
# Keys of earlier versions -> what replaced them, named in the unknown-key error.
MOVED = {
    "loader.num_negatives": "negatives.num_sampled",
    "loader.sampler": "negatives.kind (uniform or frequency; mixed adds the in-batch positives)",
    "loader.unigram_alpha": "negatives.alpha",
    "loss.in_batch": "negatives.kind (in_batch or mixed keep the in-batch positives; uniform or frequency do not)",
    "model.blocks": "model.tower.blocks", "model.heads": "model.tower.heads", "model.dropout": "model.tower.dropout",
    "model.share_item_table": "model.tower.share_item_table",
}


def from_dict(cls, data: dict, where: str = ""):
    """Builds dataclass `cls` from a dict, rejecting unknown keys and values of the wrong type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - NOT_KEYS.get(cls, set())
    unknown = sorted(set(data) - known)
    if unknown:
        moved = [f"{where}{k} is now {MOVED[where + k]}" for k in unknown if where + k in MOVED]
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}"
                          f" (allowed in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(known))})"
                          + "".join(f"; {m}" for m in moved))
    kwargs = {key: coerce(hints[key], value, f"{where}{key}") for key, value in data.items()}
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
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            value = float(value)  # PyYAML reads 1e-30 (no dot) as a string: a YAML 1.1 quirk users should not meet
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def parse_yaml(text: str, where: str):
    """YAML, with a syntax error reported as `where: line L, column C: problem` on one line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: {position}invalid YAML: {problem}") from None


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


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> JobConfig:
    """A config file on this machine (configs/*.yaml) plus overrides."""
    text = ""
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot be read: {err}") from None
    return load_config_text(text, str(path), overrides)


def upgraded(data: dict) -> dict:
    """A config saved by an earlier version (in a checkpoint) in today's keys, with the same meaning: the negatives
    section from loader.num_negatives/sampler/unigram_alpha and loss.in_batch. A config file a user edits is never
    rewritten: its old keys are errors naming the new ones."""
    loader, loss = (dict(data.get(k) or {}) for k in ("loader", "loss"))
    if {"num_negatives", "sampler", "unigram_alpha"} & set(loader) or "in_batch" in loss:
        in_batch = loss.pop("in_batch", True)
        count = loader.pop("num_negatives", 1024)
        sampler = loader.pop("sampler", "unigram")
        alpha = loader.pop("unigram_alpha", 0.75)
        if in_batch:
            kind = "in_batch" if count == 0 else "mixed"
            alpha = 0 if sampler == "uniform" else alpha
        else:
            kind = "uniform" if sampler == "uniform" else "frequency"
        data = {**data, "loader": loader, "loss": loss,
                "negatives": {"kind": kind, "num_sampled": count or 1024, "alpha": alpha}}
    return data


def load_config_text(text: str, where: str, overrides: typing.Sequence[str] = (), saved: bool = False) -> JobConfig:
    """A config's YAML text (a file's, or with `saved` one a checkpoint holds, `upgraded`) plus overrides."""
    data = parse_yaml(text, where) or {} if text else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    if saved:
        data = upgraded(data)
    for override in overrides:
        apply_override(data, override)
    return from_dict(JobConfig, data)


def to_dict(cfg: JobConfig) -> dict:
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
