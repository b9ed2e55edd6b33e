"""Recipe file to checked Recipe: compose, override, interpolate, expand matrices, validate."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.errors import GcupipeError, RecipeError
from gcupipe.recipe.compose import load_composed
from gcupipe.recipe.interpolate import (
    Deferred,
    environment_lookup,
    find_expressions,
    interpolate,
    lookup_in,
    parse_stage_ref,
)
from gcupipe.recipe.matrix import expand_matrix, variant_id
from gcupipe.recipe.model import STAGE_ID_PATTERN, RecipeModel, field_names, validate_model
from gcupipe.recipe.overrides import apply_override, environment_overrides, parse_assignment
from gcupipe.recipe.source import KeyPath, Positions, format_path
from gcupipe.stages.base import Problem, Stage, StageConfig, StageOutputs
from gcupipe.stages.registry import did_you_mean, load_stage, unknown_stage_message


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


def load_recipe(
    path: Path | str,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Recipe:
    """Load, compose and check a recipe; raises RecipeError naming file:line:col."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    data, positions = load_composed(path)
    for dotted, value, source in environment_overrides(environ):
        apply_override(data, positions, dotted, value, source)
    for text in overrides:
        dotted, value = parse_assignment(text)
        apply_override(data, positions, dotted, value, "--set")
    model = validate_model(RecipeModel, data, positions, ())
    assert isinstance(model, RecipeModel)
    return _Builder(model, data, positions, environ, path).build()


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
        needs = self._needs(stage_ids, configs)
        self._raise_errors()
        order = self._topological(stage_ids, needs)
        planned = self._expand(order, needs, classes, configs)
        self._raise_errors()
        for stage in planned.values():
            self._check_stage(stage, planned)
        self._raise_errors()
        return Recipe(self.model.name, self.path, self.data, planned, self.positions)

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
            return interpolate(
                spec.with_,
                self._static_lookup,
                self.positions,
                ("stages", stage_id, "with"),
                unescape=False,
            )
        except RecipeError as exc:
            self.errors.append(exc)
            return spec.with_

    # -- the graph --------------------------------------------------------------------------
    def _stage_classes(self) -> dict[str, type[Stage]]:  # type: ignore[type-arg]
        classes = {}
        for stage_id, spec in self.model.stages.items():
            at = ("stages", stage_id, "uses")
            try:
                classes[stage_id] = load_stage(spec.uses)
            except GcupipeError as exc:
                message = (
                    str(exc) if "failed to load" in str(exc) else unknown_stage_message(spec.uses)
                )
                self.errors.append(
                    RecipeError(message, self.positions.value_mark(at), format_path(at))
                )
        return classes

    def _needs(
        self, stage_ids: list[str], configs: dict[str, dict[str, Any]]
    ) -> dict[str, list[str]]:
        needs: dict[str, list[str]] = {}
        for index, stage_id in enumerate(stage_ids):
            spec = self.model.stages[stage_id]
            if spec.needs is None:
                declared = [stage_ids[index - 1]] if index > 0 else []
            else:
                declared = list(spec.needs)
                for position, name in enumerate(declared):
                    if name not in self.model.stages:
                        at = ("stages", stage_id, "needs", position)
                        self.errors.append(
                            RecipeError(
                                f"needs unknown stage '{name}'"
                                f"{did_you_mean(name, stage_ids)}; stages: {', '.join(stage_ids)}",
                                self.positions.value_mark(at),
                                format_path(at),
                            )
                        )
            for ref_id in self._referenced_stages(stage_id, configs[stage_id]):
                if ref_id not in declared:
                    declared.append(ref_id)  # a stage reading another's outputs needs it
            needs[stage_id] = [name for name in declared if name in self.model.stages]
        return needs

    def _referenced_stages(self, stage_id: str, config: dict[str, Any]) -> list[str]:
        found = []
        for expression in find_expressions(config):
            ref = parse_stage_ref(expression)
            if ref is None:
                continue
            if ref.stage_id not in self.model.stages:
                at = ("stages", stage_id, "with")
                self.errors.append(
                    RecipeError(
                        f"'${{{expression.strip()}}}' names unknown stage '{ref.stage_id}'"
                        f"{did_you_mean(ref.stage_id, list(self.model.stages))}",
                        self._mark_of_expression(at, config, expression),
                        format_path(self._path_of_expression(at, config, expression)),
                    )
                )
            elif ref.stage_id == stage_id:
                self.errors.append(
                    RecipeError(
                        "a stage cannot read its own outputs",
                        self._mark_of_expression(("stages", stage_id, "with"), config, expression),
                    )
                )
            elif ref.stage_id not in found:
                found.append(ref.stage_id)
        return found

    def _path_of_expression(self, at: KeyPath, value: Any, expression: str) -> KeyPath:
        if isinstance(value, dict):
            for key, item in value.items():
                if expression in find_expressions(item):
                    return self._path_of_expression(at + (key,), item, expression)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if expression in find_expressions(item):
                    return self._path_of_expression(at + (index,), item, expression)
        return at

    def _mark_of_expression(self, at: KeyPath, value: Any, expression: str):  # type: ignore[no-untyped-def]
        return self.positions.value_mark(self._path_of_expression(at, value, expression))

    def _topological(self, stage_ids: list[str], needs: dict[str, list[str]]) -> list[str]:
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done

        def visit(stage_id: str, trail: list[str]) -> None:
            if state.get(stage_id) == 2:
                return
            if state.get(stage_id) == 1:
                cycle = trail[trail.index(stage_id) :] + [stage_id]
                first, second = cycle[0], cycle[1]
                spec_needs = self.model.stages[first].needs or []
                at: KeyPath = ("stages", first, "needs")
                if second in spec_needs:
                    at = at + (spec_needs.index(second),)
                raise RecipeError(
                    f"needs cycle: {' -> '.join(cycle)}",
                    self.positions.value_mark(at),
                    format_path(at),
                )
            state[stage_id] = 1
            for upstream in needs[stage_id]:
                visit(upstream, trail + [stage_id])
            state[stage_id] = 2
            order.append(stage_id)

        for stage_id in stage_ids:
            visit(stage_id, [])
        return order

    # -- matrix expansion -------------------------------------------------------------------
    def _expand(
        self,
        order: list[str],
        needs: dict[str, list[str]],
        classes: dict[str, type[Stage]],  # type: ignore[type-arg]
        configs: dict[str, dict[str, Any]],
    ) -> dict[str, PlannedStage]:
        variants: dict[str, list[dict[str, Any]]] = {}
        planned: dict[str, PlannedStage] = {}
        for stage_id in order:
            spec = self.model.stages[stage_id]
            at: KeyPath = ("stages", stage_id, "matrix")
            inherited = [variants[n] for n in needs[stage_id] if variants[n] != [{}]]
            try:
                if spec.matrix is not None:
                    if inherited:
                        raise RecipeError(
                            "a matrix stage cannot need another matrix stage; it already runs "
                            "once per upstream combination",
                            self.positions.value_mark(at),
                            format_path(at),
                        )
                    combos = expand_matrix(spec.matrix, self.positions, at)
                elif inherited:
                    if any(other != inherited[0] for other in inherited):
                        raise RecipeError(
                            "needs two matrix stages with different combinations",
                            self.positions.value_mark(("stages", stage_id, "needs")),
                            format_path(("stages", stage_id, "needs")),
                        )
                    combos = inherited[0]
                else:
                    combos = [{}]
            except RecipeError as exc:
                self.errors.append(exc)
                variants[stage_id] = [{}]
                continue
            variants[stage_id] = combos
            for combo in combos:
                expanded = variant_id(stage_id, combo) if combo else stage_id
                targets = {
                    n: variant_id(n, combo) if variants[n] != [{}] else n for n in needs[stage_id]
                }
                config = configs[stage_id]
                if spec.matrix is not None:
                    config = self._apply_matrix(stage_id, config, combo)
                planned[expanded] = PlannedStage(
                    id=expanded,
                    base_id=stage_id,
                    uses=spec.uses,
                    stage_class=classes.get(stage_id, Stage),  # type: ignore[type-abstract]
                    config=config,
                    needs=list(targets.values()),
                    cache=spec.cache,
                    matrix=combo,
                    description=spec.description,
                    ref_targets=targets,
                )
        return planned

    def _apply_matrix(
        self, stage_id: str, config: dict[str, Any], combo: dict[str, Any]
    ) -> dict[str, Any]:
        def lookup(expression: str) -> Any:
            expression = expression.strip()
            if expression.startswith("matrix."):
                return lookup_in(combo, expression[len("matrix.") :], "matrix")
            raise Deferred

        try:
            return interpolate(
                config, lookup, self.positions, ("stages", stage_id, "with"), unescape=False
            )
        except RecipeError as exc:
            self.errors.append(exc)
            return config

    # -- per-stage checks -------------------------------------------------------------------
    def _check_stage(self, stage: PlannedStage, planned: dict[str, PlannedStage]) -> None:
        prefix: KeyPath = ("stages", stage.base_id, "with")
        deferred: list[KeyPath] = []

        def lookup(expression: str) -> Any:
            expression = expression.strip()
            ref = parse_stage_ref(expression)
            if ref is not None:
                upstream = planned[stage.ref_targets[ref.stage_id]]
                outputs = field_names(upstream.stage_class.Outputs)
                if ref.output not in outputs:
                    raise RecipeError(
                        f"stage '{ref.stage_id}' (uses: {upstream.uses}) has no output "
                        f"'{ref.output}'{did_you_mean(ref.output, outputs)}; "
                        f"its outputs: {', '.join(outputs)}"
                    )
                raise Deferred
            if expression.startswith("matrix."):
                raise RecipeError(
                    f"'${{{expression}}}' is used but stage '{stage.base_id}' has no matrix"
                )
            raise RecipeError(f"cannot resolve '${{{expression}}}'")

        try:
            preview = interpolate(stage.config, lookup, self.positions, prefix, unescape=True)
        except RecipeError as exc:
            self.errors.append(exc)
            return
        deferred = _deferred_paths(preview)
        if stage.stage_class is Stage:
            return  # unknown stage type, already reported
        try:
            config = validate_model(
                stage.stage_class.Config, preview, self.positions, prefix, ignore=deferred
            )
        except RecipeError as exc:
            self.errors.append(exc)
            return
        if deferred:
            return  # stage.check() needs the final values; it runs again at run time
        problems = stage.stage_class().check(config)  # type: ignore[arg-type]
        self.errors.extend(problem_errors(problems, prefix, self.positions))

    def _raise_errors(self) -> None:
        if self.errors:
            raise RecipeError.combine(self.errors)


def _valid_id(stage_id: str) -> bool:
    return re.match(STAGE_ID_PATTERN, stage_id) is not None


def _deferred_paths(value: Any, path: KeyPath = ()) -> list[KeyPath]:
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in _deferred_paths(item, path + (key,))]
    if isinstance(value, list):
        return [
            p for index, item in enumerate(value) for p in _deferred_paths(item, path + (index,))
        ]
    if isinstance(value, str) and find_expressions(value):
        return [path]
    return []


def resolve_stage_config(
    stage: PlannedStage, outputs: Mapping[str, StageOutputs], positions: Positions
) -> StageConfig:
    """The final config of a stage whose upstream stages have finished."""
    prefix: KeyPath = ("stages", stage.base_id, "with")
    config = validate_model(stage.stage_class.Config, _interpolated(stage, outputs, positions),
                            positions, prefix)  # fmt: skip
    assert isinstance(config, StageConfig)
    problems = stage.stage_class().check(config)
    if problems:
        raise RecipeError.combine(problem_errors(problems, prefix, positions))
    return config


def preview_stage_config(
    stage: PlannedStage, outputs: Mapping[str, StageOutputs], positions: Positions
) -> StageConfig | None:
    """The config a stage will run with, for `plan` before its upstream has run: an output not
    produced yet reads `<stages.ID.outputs.NAME>`. None when such a placeholder cannot stand
    where it is used (a number, say); no checks run on it."""
    try:
        config = stage.stage_class.Config.model_validate(
            _interpolated(stage, outputs, positions, placeholders=True)
        )
    except (ValueError, TypeError):
        return None
    assert isinstance(config, StageConfig)
    return config


def _interpolated(
    stage: PlannedStage,
    outputs: Mapping[str, StageOutputs],
    positions: Positions,
    placeholders: bool = False,
) -> Any:
    def lookup(expression: str) -> Any:
        ref = parse_stage_ref(expression)
        assert ref is not None, expression  # anything else was resolved at load time
        target = stage.ref_targets[ref.stage_id]
        if placeholders and target not in outputs:
            return f"<stages.{ref.stage_id}.outputs.{ref.output}>"
        value = getattr(outputs[target], ref.output)
        return str(value) if isinstance(value, Path) else value

    prefix: KeyPath = ("stages", stage.base_id, "with")
    return interpolate(stage.config, lookup, positions, prefix, unescape=True)


def problem_errors(
    problems: Sequence[Problem], prefix: KeyPath, positions: Positions
) -> list[RecipeError]:
    """A stage's check() problems as recipe errors pointing at the key they are about."""
    errors = []
    for problem in problems:
        at = prefix + tuple(problem.key.split(".")) if problem.key else prefix
        errors.append(RecipeError(problem.message, positions.key_mark(at), format_path(at)))
    return errors
