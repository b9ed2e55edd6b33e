"""The stage graph of a recipe: who needs whom (declared and through `${stages...}`), in order."""

from __future__ import annotations

from typing import Any

from gcupipe.errors import Mark, RecipeError, did_you_mean
from gcupipe.recipe.interpolate import find_expressions, parse_stage_ref
from gcupipe.recipe.model import RecipeModel
from gcupipe.recipe.source import KeyPath, Positions, format_path


def stage_needs(
    model: RecipeModel,
    positions: Positions,
    configs: dict[str, dict[str, Any]],
    errors: list[RecipeError],
) -> dict[str, list[str]]:
    """Each stage's upstream: its `needs:` (default: the stage before it) plus every stage whose
    outputs its config reads. Problems go to `errors`."""
    stage_ids = list(model.stages)
    needs: dict[str, list[str]] = {}
    for index, stage_id in enumerate(stage_ids):
        spec = model.stages[stage_id]
        if spec.needs is None:
            declared = [stage_ids[index - 1]] if index > 0 else []
        else:
            declared = list(spec.needs)
            for position, name in enumerate(declared):
                if name not in model.stages:
                    at = ("stages", stage_id, "needs", position)
                    errors.append(
                        RecipeError(
                            f"needs unknown stage '{name}'"
                            f"{did_you_mean(name, stage_ids)}; stages: {', '.join(stage_ids)}",
                            positions.value_mark(at),
                            format_path(at),
                        )
                    )
        for ref_id in _referenced_stages(model, positions, stage_id, configs[stage_id], errors):
            if ref_id not in declared:
                declared.append(ref_id)  # a stage reading another's outputs needs it
        needs[stage_id] = [name for name in declared if name in model.stages]
    return needs


def _referenced_stages(
    model: RecipeModel,
    positions: Positions,
    stage_id: str,
    config: dict[str, Any],
    errors: list[RecipeError],
) -> list[str]:
    found = []
    for expression in find_expressions(config):
        ref = parse_stage_ref(expression)
        if ref is None:
            continue
        if ref.stage_id not in model.stages:
            at = ("stages", stage_id, "with")
            errors.append(
                RecipeError(
                    f"'${{{expression.strip()}}}' names unknown stage '{ref.stage_id}'"
                    f"{did_you_mean(ref.stage_id, list(model.stages))}",
                    _mark_of_expression(positions, at, config, expression),
                    format_path(_path_of_expression(at, config, expression)),
                )
            )
        elif ref.stage_id == stage_id:
            errors.append(
                RecipeError(
                    "a stage cannot read its own outputs",
                    _mark_of_expression(
                        positions, ("stages", stage_id, "with"), config, expression
                    ),
                )
            )
        elif ref.stage_id not in found:
            found.append(ref.stage_id)
    return found


def _path_of_expression(at: KeyPath, value: Any, expression: str) -> KeyPath:
    if isinstance(value, dict):
        for key, item in value.items():
            if expression in find_expressions(item):
                return _path_of_expression(at + (key,), item, expression)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if expression in find_expressions(item):
                return _path_of_expression(at + (index,), item, expression)
    return at


def _mark_of_expression(
    positions: Positions, at: KeyPath, value: Any, expression: str
) -> Mark | None:
    return positions.value_mark(_path_of_expression(at, value, expression))


def topological_order(
    model: RecipeModel, positions: Positions, needs: dict[str, list[str]]
) -> list[str]:
    """Stage ids so that every stage follows its needs; RecipeError naming a cycle."""
    stage_ids = list(model.stages)
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(stage_id: str, trail: list[str]) -> None:
        if state.get(stage_id) == 2:
            return
        if state.get(stage_id) == 1:
            cycle = trail[trail.index(stage_id) :] + [stage_id]
            first, second = cycle[0], cycle[1]
            spec_needs = model.stages[first].needs or []
            at: KeyPath = ("stages", first, "needs")
            if second in spec_needs:
                at = at + (spec_needs.index(second),)
            raise RecipeError(
                f"needs cycle: {' -> '.join(cycle)}",
                positions.value_mark(at),
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
