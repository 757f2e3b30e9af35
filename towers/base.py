"""What a query tower provides: everything that differs from one tower to another, in one place.

The rest of the project asks the registry (towers/__init__.py) for the job's tower and calls these; nothing
outside towers/ compares a tower's name. docs/towers.md is the checklist for adding one.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig, EmbeddingConfig

from config import ConfigError, JobConfig
from data.catalogue import Catalogue
from data.loader import BatchLayout
from data.schema import Metadata


@dataclass
class Exported:
    """A trained tower converted for serving: the query tower without TorchRec (a serving module that
    serving/model.py rebuilds from the manifest), every catalogue item's embedding, the manifest's
    tower-specific fields."""

    query_tower: nn.Module
    item_embeddings: np.ndarray
    manifest: dict


class Tower(ABC):
    """One query tower. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]  # model.query_tower
    summary: ClassVar[str]  # a few words for the run's description
    Config: ClassVar[type]  # its section, model.tower: a dataclass whose fields are read by this module
    layout: ClassVar[BatchLayout]  # the batches it trains and evaluates on (data/loader.py)

    def section(self, cfg: JobConfig) -> Any:
        """The job's model.tower, typed (towers.resolve has run)."""
        if not isinstance(cfg.model.tower, self.Config):
            raise ConfigError(f"model.tower is not the {self.name} tower's section (towers.resolve(cfg) first)")
        return cfg.model.tower

    def check(self, cfg: JobConfig) -> None:  # noqa: B027 (optional: most towers need no cross-section check)
        """Checks across sections that only this tower needs; ConfigError names the key."""

    @abstractmethod
    def bag_tables(self, meta: Metadata, cfg: JobConfig) -> list[EmbeddingBagConfig]:
        """The EmbeddingBagCollection's tables (towers/shared.py:feature_tables plus the tower's own)."""

    def sequence_tables(self, meta: Metadata, cfg: JobConfig) -> list[EmbeddingConfig]:
        """The EmbeddingCollection's tables (unpooled lookups); none by default."""
        return []

    @abstractmethod
    def build(self, meta: Metadata, cfg: JobConfig, device: torch.device) -> nn.Module:
        """The TorchRec towers, tables on the meta device (DMP materialises them sharded). The module has
        `encode(batch) -> (queries, candidates)`, `item_embeddings(catalogue, device)`,
        `query_embeddings(batch, device)` and `collections()` (its embedding modules, whose optimizer is fused
        into the backward)."""

    @abstractmethod
    def export(self, cfg: JobConfig, meta: Metadata, catalogue: Catalogue,
               load: Callable[[Any], None]) -> Exported:
        """The serving form of a checkpoint: `load(component)` fills a checkpoint component (state_dict /
        load_state_dict under the training model's names) with the checkpoint's weights."""

    @abstractmethod
    def encode_queries(self, query_tower: nn.Module, batch) -> torch.Tensor:
        """The exported query tower's embeddings of an evaluation batch of `layout` (export measures its index's
        recall with them)."""


def typed_section(tower: Tower, section: Any, parse: Callable[[type, dict, str], Any]) -> Any:
    """model.tower as the tower's dataclass: a mapping from the file is parsed strictly (`parse` is
    config.loading.from_dict: unknown keys are named with the fields the tower allows)."""
    if isinstance(section, tower.Config):
        return section
    if dataclasses.is_dataclass(section):
        raise ConfigError(f"model.tower is a {type(section).__name__}, but model.query_tower={tower.name} takes "
                          f"{tower.Config.__name__}")
    return parse(tower.Config, section or {}, "model.tower.")
