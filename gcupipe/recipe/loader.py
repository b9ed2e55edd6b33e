"""Recipe file to checked Recipe: compose, override, interpolate, expand matrices, validate."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gcupipe.errors import RecipeError
from gcupipe.plugins import PluginLoadError, UnknownPlugin
from gcupipe.recipe.compose import compose
from gcupipe.recipe.graph import stage_needs, topological_order
from gcupipe.recipe.interpolate import (
    Deferred,
    environment_lookup,
    interpolate,
    lookup_in,
)
from gcupipe.recipe.matrix import expand_stages
from gcupipe.recipe.model import STAGE_ID_PATTERN, RecipeModel, validate_model
from gcupipe.recipe.overrides import apply_override, environment_overrides, parse_assignment
from gcupipe.recipe.planned import Recipe
from gcupipe.recipe.resolve import check_stage
from gcupipe.recipe.source import Positions, format_path
from gcupipe.stages.base import Stage
from gcupipe.stages.registry import STAGES


def load_recipe(
    path: Path | str,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Recipe:
    """Load, compose and check a recipe; raises RecipeError naming file:line:col."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    composed = compose(path)
    data, positions = composed.data, composed.positions
    for dotted, value, source in environment_overrides(environ):
        apply_override(data, positions, dotted, value, source)
    for text in overrides:
        dotted, value = parse_assignment(text)
        apply_override(data, positions, dotted, value, "--set")
    model = validate_model(RecipeModel, data, positions, ())
    assert isinstance(model, RecipeModel)
    recipe = _Builder(model, data, positions, environ, path).build()
    recipe.sources = composed.files
    return recipe


class _Builder:
    def __init__(
        self,
        model: RecipeModel,
        data: dict[str, Any],
        positions: Positions,
        environ: Mapping[str, str],
        path: Path,
    ):
        self.model = model
        self.data = data
        self.positions = positions
        self.env_lookup = environment_lookup(environ)
        self.path = path
        self.errors: list[RecipeError] = []
        self.vars = self._resolve_vars()

    def build(self) -> Recipe:
        stage_ids = list(self.model.stages)
        for stage_id in stage_ids:
            if not _valid_id(stage_id):
                self.errors.append(
                    RecipeError(
                        "stage ids use letters, digits, '_' and '-' and start with a letter",
                        self.positions.key_mark(("stages", stage_id)),
                        format_path(("stages", stage_id)),
                    )
                )
        classes = self._stage_classes()
        configs = {sid: self._interpolate_static(sid) for sid in stage_ids}
        if self.model.target is not None:  # the recipe's target, where a stage names none
            for sid, config in configs.items():
                takes = sid in classes and "target" in classes[sid].Config.model_fields
                if takes and "target" not in config:
                    configs[sid] = {**config, "target": self.model.target}
        needs = stage_needs(self.model, self.positions, configs, self.errors)
        self._raise_errors()
        order = topological_order(self.model, self.positions, needs)
        planned = expand_stages(
            self.model, self.positions, order, needs, classes, configs, self.errors
        )
        self._raise_errors()
        for stage in planned.values():
            check_stage(stage, planned, self.positions, self.errors)
        self._raise_errors()
        return Recipe(
            self.model.name,
            self.path,
            self.data,
            planned,
            self.positions,
            self.model.executor,
            self.model.cache,
            vars=self.vars,
        )

    # -- vars and interpolation -------------------------------------------------------------
    def _resolve_vars(self) -> dict[str, Any]:
        raw = self.model.vars
        resolved: dict[str, Any] = {}
        resolving: list[str] = []

        def lookup(expression: str) -> Any:
            if expression.startswith("env:"):
                return self.env_lookup(expression)
            if expression.startswith("vars."):
                name = expression[len("vars.") :].split(".")[0]
                if name in raw and name not in resolved:
                    if name in resolving:
                        cycle = " -> ".join([*resolving, name])
                        raise RecipeError(f"vars refer to each other in a cycle: {cycle}")
                    resolving.append(name)
                    try:
                        resolved[name] = interpolate(
                            raw[name], lookup, self.positions, ("vars", name), unescape=False
                        )
                    finally:
                        resolving.pop()
                return lookup_in({"vars": {**raw, **resolved}}, expression, "")
            raise RecipeError(
                f"'${{{expression}}}' cannot be used in vars; vars may use ${{vars.NAME}} "
                "and ${env:NAME}"
            )

        for name in raw:
            if name not in resolved:
                try:
                    lookup(f"vars.{name}")
                except RecipeError as exc:
                    self.errors.append(exc)
                    resolved[name] = raw[name]
        return resolved

    def _static_lookup(self, expression: str) -> Any:
        expression = expression.strip()
        if expression.startswith("env:"):
            return self.env_lookup(expression)
        if expression.startswith("vars."):
            return lookup_in(self.vars, expression[len("vars.") :], "vars")
        if expression.startswith("matrix.") or expression.startswith("stages."):
            raise Deferred
        raise RecipeError(
            f"unknown interpolation '${{{expression}}}'; use ${{vars.NAME}}, ${{env:NAME}}, "
            "${env:NAME,default}, ${matrix.AXIS} or ${stages.ID.outputs.KEY} "
            "(write $${ for a literal ${)"
        )

    def _interpolate_static(self, stage_id: str) -> dict[str, Any]:
        spec = self.model.stages[stage_id]
        try:
            interpolated: dict[str, Any] = interpolate(
                spec.with_,
                self._static_lookup,
                self.positions,
                ("stages", stage_id, "with"),
                unescape=False,
            )
        except RecipeError as exc:
            self.errors.append(exc)
            return spec.with_
        return interpolated

    def _stage_classes(self) -> dict[str, type[Stage]]:  # type: ignore[type-arg]
        classes = {}
        for stage_id, spec in self.model.stages.items():
            at = ("stages", stage_id, "uses")
            try:
                classes[stage_id] = STAGES.get(spec.uses)
            except (UnknownPlugin, PluginLoadError) as exc:
                self.errors.append(
                    RecipeError(str(exc), self.positions.value_mark(at), format_path(at))
                )
        return classes

    def _raise_errors(self) -> None:
        if self.errors:
            raise RecipeError.combine(self.errors)


def _valid_id(stage_id: str) -> bool:
    return re.match(STAGE_ID_PATTERN, stage_id) is not None
