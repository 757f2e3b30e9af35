"""What a resume may change: each config key's rule (SAFE, SHAPE, POSITION, marked beside the field in
config/job.py), checked against the config saved in the checkpoint."""

from __future__ import annotations

import towers
from config import ConfigError, JobConfig, flatten, to_dict
from config.job import POSITION, SAFE, SHAPE, resume_rules
from storage import Location

# What a resume may change: each config field's rule, marked beside it in config/job.py.
RESUME_RULES = resume_rules(JobConfig)


def rule(key: str) -> str:
    """The resume rule of a flattened config key (config/job.py), "" for none; `section.` rules cover its keys."""
    return next((kind for pattern, kind in RESUME_RULES.items()
                 if key == pattern or (pattern.endswith(".") and key.startswith(pattern))), "")


def compatibility(saved: JobConfig, current: JobConfig, saved_world: int, world: int, at_epoch_start: bool,
                  path: Location) -> list[str]:
    """The changes a resume makes, as `key: old -> new` lines; raises ConfigError for any it may not make."""
    old, new = flatten(to_dict(towers.resolve(saved))), flatten(to_dict(towers.resolve(current)))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    allowed = current.checkpoint.allow_changes
    problems, notes = [], []
    for key in changed:
        line = f"{key}: {old.get(key)} -> {new.get(key)}"
        if rule(key) == SAFE:
            notes.append(line)
        elif rule(key) == SHAPE:
            problems.append(f"{line} (changes the checkpoint's tensors: start a new checkpoint.dir)")
        elif rule(key) == POSITION and not at_epoch_start:
            problems.append(f"{line} (changes what the saved batch position means: resume from an epoch-end "
                            f"checkpoint, with checkpoint.allow_changes=[{key}])")
        elif key not in allowed:
            problems.append(f"{line} (allow it with checkpoint.allow_changes=[{key}])")
        else:
            notes.append(line)
    if world != saved_world:
        line = f"world size: {saved_world} -> {world}"
        if at_epoch_start:
            notes.append(line)
        else:
            problems.append(f"{line} (the checkpoint stopped mid-epoch, and each rank's share of the epoch depends "
                            f"on the world size: resume with {saved_world} processes, or from an epoch-end "
                            f"checkpoint)")
    if problems:
        raise ConfigError(f"cannot resume from {path} with this config: " + "; ".join(problems))
    return notes
