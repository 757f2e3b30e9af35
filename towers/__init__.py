"""The query towers, one module each, and the registry the rest of the project asks.

    tower = towers.of(cfg)          # the job's tower, its section typed and checked
    tower.build(meta, cfg, device)  # the TorchRec towers; tower.layout: the loader's batches; ...

A tower is chosen by `model.query_tower` and configured by `model.tower`, a section whose fields are the
chosen tower's only (its dataclass, in its module). Adding one: docs/towers.md.
"""

from __future__ import annotations

from config import ConfigError, JobConfig
from config.loading import from_dict
from towers.bags import TOWER as BAGS
from towers.base import Exported, Tower, typed_section
from towers.hstu import TOWER as HSTU
from towers.transformer import TOWER as TRANSFORMER

# The registry: one line per tower module.
TOWERS: dict[str, Tower] = {t.name: t for t in (BAGS, TRANSFORMER, HSTU)}
DEFAULT = BAGS.name  # model.query_tower when a config names none

__all__ = ["DEFAULT", "TOWERS", "Exported", "Tower", "get", "of", "resolve"]


def get(name: str) -> Tower:
    if name not in TOWERS:
        raise ConfigError(f"model.query_tower: unknown tower '{name}' (registered: {', '.join(TOWERS)})")
    return TOWERS[name]


def resolve(cfg: JobConfig) -> JobConfig:
    """Fills the default tower, types model.tower as the chosen tower's section and runs the checks that depend
    on the tower. Idempotent; `of` calls it, so every user of a config sees it resolved."""
    cfg.model.query_tower = cfg.model.query_tower or DEFAULT
    tower = get(cfg.model.query_tower)
    cfg.model.tower = typed_section(tower, cfg.model.tower, from_dict)
    if cfg.loss.mask_seen and not tower.layout.sequence:
        raise ConfigError(f"loss.mask_seen=true needs a tower trained on sequences; the {tower.name} tower's batches "
                          f"do not carry each query's whole history")
    if cfg.loader.bucket_by_length and not tower.layout.sequence:
        raise ConfigError(f"loader.bucket_by_length=true batches sequence rows by length; the {tower.name} tower's "
                          f"rows are single examples with no stack to pad (set it false)")
    tower.check(cfg)
    return cfg


def of(cfg: JobConfig) -> Tower:
    """The job's tower (the config resolved first)."""
    resolve(cfg)
    return TOWERS[cfg.model.query_tower]
