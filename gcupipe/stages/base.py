"""The stage plugin API: typed Config, typed Outputs and one `run`, for built-ins and plugins."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gcupipe.errors import StageError
from gcupipe.stages.resources import Resources

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape


class StageConfig(BaseModel):
    """Base of every stage's `with:` block. Unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetedConfig(StageConfig):
    """A stage whose work depends on the serving target (quantize writes for it, validate
    judges by its loaders, serve derives its flags): `target:` here, else the recipe's."""

    target: str | None = Field(
        default=None,
        description="Serving target: gcu (vLLM-GCU), ascend (vllm-ascend), cuda, cpu (upstream "
        "vLLM), or one a plugin registers (`gcupipe.targets`). Default: the recipe's `target:`.",
    )

    @field_validator("target")
    @classmethod
    def _known_target(cls, name: str | None) -> str | None:
        from gcupipe.targets.registry import known_target

        return known_target(name)


class StageOutputs(BaseModel):
    """Base of every stage's outputs. `Path` fields that point inside the stage's output
    directory are relocated by the engine when the finished output is moved into place."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Problem:
    """A problem a stage finds in its config before anything runs (lint and plan time).

    `key` is a dotted path inside `with:` (e.g. "group_size"), so the recipe error can point
    at the line that causes it."""

    message: str
    key: str | None = None


class ProgressTask:
    """A handle on one progress bar; stages call `advance` as work completes."""

    def __init__(self, update: Callable[[float | None, float | None], None]):
        self._update = update
        self.completed = 0.0

    def advance(self, amount: float = 1.0) -> None:
        self.completed += amount
        self._update(self.completed, None)

    def set_total(self, total: float) -> None:
        self._update(self.completed, total)


ProgressFactory = Callable[[str, float | None, str], tuple[ProgressTask, Callable[[], None]]]
"""(description, total, unit) -> (task, finish). Provided by the engine."""


@dataclass(frozen=True)
class Provenance:
    """How one stage upstream (direct or further up) made its result: what a model card or a
    report states about where an artifact came from."""

    stage_id: str
    uses: str
    config: dict[str, Any]  # resolved, secrets redacted, run paths as <run>/...
    outputs: dict[str, Any]
    cache_key: str
    outputs_digest: str


@dataclass
class StageContext:
    """What the engine hands a running stage. Everything a stage writes goes to `output_dir`,
    which the engine moves into place only when `run` returns successfully. `scratch_dir` is
    the stage's work space for this cache key: it survives a failed or killed run, so a long
    stage can resume from what it left there (engine/store.py), and goes when the stage
    succeeds."""

    stage_id: str
    output_dir: Path
    scratch_dir: Path
    cache_dir: Path
    run_dir: Path
    upstream: dict[str, StageOutputs] = field(default_factory=dict)
    lineage: list[Provenance] = field(default_factory=list)  # every stage upstream, in order
    log: Callable[[str], None] = print
    progress_factory: ProgressFactory | None = None
    secrets: Callable[[str], None] = lambda value: None

    @contextmanager
    def progress(
        self, description: str, total: float | None = None, unit: str = ""
    ) -> Iterator[ProgressTask]:
        """A progress bar for a long step: `with ctx.progress("quantize", total=30) as bar`."""
        if self.progress_factory is None:
            yield ProgressTask(lambda completed, total: None)
            return
        task, finish = self.progress_factory(description, total, unit)
        try:
            yield task
        finally:
            finish()

    def upstream_model_dirs(self, stage_type: str) -> dict[Path, list[str]]:
        """Each distinct model directory the upstream stages hand on (resolved) -> the ids of
        the stages that hand it on; a StageError naming the stage type when there is none."""
        found: dict[Path, list[str]] = {}
        for stage_id, outputs in self.upstream.items():
            model_dir = getattr(outputs, "model_dir", None)
            if model_dir is not None:
                found.setdefault(Path(model_dir).resolve(), []).append(stage_id)
        if not found:
            raise StageError(
                f"{stage_type}: no model: set `model:` or add a stage that outputs a model_dir "
                "(download, quantize, validate) to `needs`"
            )
        return found

    def upstream_model_dir(self, stage_type: str) -> Path:
        """The one model directory the upstream stages hand on (validate passes quantize's on:
        still one model); a StageError naming the stage type when there is none or several."""
        found = self.upstream_model_dirs(stage_type)
        if len(found) > 1:
            names = ", ".join(sorted(stage for stages in found.values() for stage in stages))
            raise StageError(
                f"{stage_type}: several upstream models ({names}): set `model:` to pick one"
            )
        return next(iter(found))

    def source_model_dir(self) -> Path | None:
        """The float model the upstream chain started from: the nearest stage above that names
        a `source_model_dir` (quantize), else a download's `model_dir`."""
        for record in reversed(self.lineage):
            value = record.outputs.get("source_model_dir") or (
                record.outputs.get("model_dir") if record.uses == "download" else None
            )
            if value:
                return Path(value)
        return None

    def upstream_outputs(self, kind: type[OutputsT]) -> list[OutputsT]:
        """The outputs of upstream stages of one type (e.g. every ModelOutputs this stage needs)."""
        return [outputs for outputs in self.upstream.values() if isinstance(outputs, kind)]


OutputsT = TypeVar("OutputsT", bound=StageOutputs)
ConfigT = TypeVar("ConfigT", bound=StageConfig)


class Stage(abc.ABC, Generic[ConfigT, OutputsT]):
    """A pipeline step. Subclasses set `Config`, `Outputs` and `version`, and implement `run`.

    `version` is part of every cache key: bump it when the stage would now produce different
    outputs from the same config, so cached results of the old code are not reused."""

    Config: ClassVar[type[StageConfig]]
    Outputs: ClassVar[type[StageOutputs]]
    version: ClassVar[str] = "1"
    reports: ClassVar[frozenset[str]] = frozenset()
    """Output files that say how the run went (timings, absolute paths) rather than what it
    made: left out of the digest downstream cache keys are built on, so a stage below them is
    the same in every run directory ("dir/" leaves out a directory)."""

    @abc.abstractmethod
    def run(self, config: ConfigT, ctx: StageContext) -> OutputsT:
        """Do the work, write files under `ctx.output_dir`, return the typed outputs."""

    def check(self, config: ConfigT) -> list[Problem]:
        """Problems visible before running (lint/plan). Default: none beyond the Config's own."""
        return []

    def resources(self, config: ConfigT) -> Resources:
        """What one run of the stage needs where it runs (one CPU by default); a recipe's
        `resources:` replaces these key by key."""
        return Resources()

    def describe(self, config: ConfigT, cache_dir: Path) -> str | None:
        """One line for `gcupipe plan` (e.g. where a model will come from). Default: none."""
        return None

    def estimate(
        self, config: ConfigT, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        """`gcupipe plan --estimate`: the disk this stage will write, its peak RSS and a rough
        time (gcupipe/estimate.py). `upstream` is the model the stages it needs hand on (read
        from disk when it exists, else their own estimate). Default: nothing to tell."""
        return None

    def lint_notes(self, config: ConfigT) -> list[str]:
        """What `gcupipe lint` states about the stage's result (quantize: the target and the
        exact serve flags). Default: nothing."""
        return []

    def cache_inputs(self, config: ConfigT) -> list[Path]:
        """Files or directories outside the run whose change must invalidate the cache.
        Default: every existing path in the config. They are fingerprinted by size and mtime."""
        paths: list[Path] = []
        for value in _walk_values(config.model_dump()):
            if isinstance(value, Path) and value.exists():
                paths.append(value)
        return paths


def _walk_values(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk_values(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _walk_values(item)
    else:
        yield value
