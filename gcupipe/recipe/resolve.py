"""A stage's final config: checked at load time as far as it is known, resolved when its upstream
has run (or previewed with placeholders for `plan`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gcupipe.errors import RecipeError, did_you_mean
from gcupipe.recipe.interpolate import Deferred, find_expressions, interpolate, parse_stage_ref
from gcupipe.recipe.model import field_names, validate_model
from gcupipe.recipe.planned import PlannedStage, Recipe
from gcupipe.recipe.source import KeyPath, Positions, format_path
from gcupipe.stages.base import Problem, Stage, StageConfig, StageOutputs


def check_stage(
    stage: PlannedStage,
    planned: dict[str, PlannedStage],
    positions: Positions,
    errors: list[RecipeError],
) -> None:
    """Load-time checks of one stage: references to upstream outputs exist, the config
    validates as far as it is known, and the stage's own check() where it is fully known."""
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
        preview = interpolate(stage.config, lookup, positions, prefix, unescape=True)
    except RecipeError as exc:
        errors.append(exc)
        return
    deferred = _deferred_paths(preview)
    if stage.stage_class is Stage:
        return  # unknown stage type, already reported
    try:
        config = validate_model(
            stage.stage_class.Config, preview, positions, prefix, ignore=deferred
        )
    except RecipeError as exc:
        errors.append(exc)
        return
    if deferred:
        return  # stage.check() needs the final values; it runs again at run time
    problems = stage.stage_class().check(config)
    errors.extend(problem_errors(problems, prefix, positions))


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
    config = validate_model(
        stage.stage_class.Config, _interpolated(stage, outputs, positions), positions, prefix
    )
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


def lint_notes(recipe: Recipe) -> list[tuple[str, str]]:
    """(stage id, line) for what `gcupipe lint` states about each stage's result before
    anything runs (quantize: the target and the exact serve flags)."""
    notes = []
    for stage in recipe.stages.values():
        preview = preview_stage_config(stage, {}, recipe.positions)
        if preview is not None:
            notes += [(stage.id, line) for line in stage.stage_class().lint_notes(preview)]
    return notes


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
