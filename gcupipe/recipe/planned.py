"""A loaded recipe: the stages to run, in order, each with its class and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.recipe.model import ExecutorSettings, RemoteCacheSettings
from gcupipe.recipe.references import ComposedFile
from gcupipe.recipe.source import KeyPath, Positions
from gcupipe.stages.base import Stage
from gcupipe.stages.resources import Resources


@dataclass
class PlannedStage:
    """One stage to run (a matrix stage becomes one PlannedStage per combination)."""

    id: str
    base_id: str
    uses: str
    stage_class: type[Stage]  # type: ignore[type-arg]
    config: dict[str, Any]  # `with:`, interpolated except for upstream outputs
    needs: list[str]
    cache: bool
    matrix: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    ref_targets: dict[str, str] = field(default_factory=dict)  # base id -> expanded id
    resources: Resources | None = None  # the recipe's `resources:` (over the type's defaults)
    retries: int = 1

    @property
    def path(self) -> KeyPath:
        return ("stages", self.base_id)


@dataclass
class Recipe:
    name: str
    source: Path | None
    document: dict[str, Any]  # merged and overridden, before interpolation (for the lock file)
    stages: dict[str, PlannedStage]  # in an order where every stage follows its needs
    positions: Positions
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    remote_cache: RemoteCacheSettings | None = None
    sources: list[ComposedFile] = field(default_factory=list)  # the recipe file first
    vars: dict[str, Any] = field(default_factory=dict)  # interpolated
