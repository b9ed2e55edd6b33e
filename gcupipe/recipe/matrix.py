"""`matrix:` on a stage: a cartesian product with include/exclude, with GitHub Actions semantics."""

from __future__ import annotations

import itertools
from typing import Any

from gcupipe.errors import RecipeError
from gcupipe.recipe.interpolate import Deferred, interpolate, lookup_in
from gcupipe.recipe.model import RecipeModel
from gcupipe.recipe.planned import PlannedStage
from gcupipe.recipe.source import KeyPath, Positions, format_path
from gcupipe.stages.base import Stage


def expand_matrix(spec: Any, positions: Positions, path: KeyPath) -> list[dict[str, Any]]:
    """The combinations of a matrix spec, in product order, excludes removed, includes applied."""

    def error(message: str, at: KeyPath) -> RecipeError:
        return RecipeError(message, positions.value_mark(at), format_path(at))

    if not isinstance(spec, dict) or not spec:
        raise error("a matrix is a mapping of axis -> list of values", path)
    axes = {key: value for key, value in spec.items() if key not in ("include", "exclude")}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise error(f"matrix axis '{key}' needs a non-empty list of values", path + (key,))
        for index, item in enumerate(values):
            if isinstance(item, dict | list):
                raise error("matrix values must be scalars", path + (key, index))
    includes = _entries(spec, "include", positions, path)
    excludes = _entries(spec, "exclude", positions, path)

    combos: list[dict[str, Any]] = (
        [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
        if axes
        else []
    )
    for index, entry in enumerate(excludes):
        for key in entry:
            if key not in axes:
                raise error(
                    f"exclude names '{key}', which is not a matrix axis "
                    f"(axes: {', '.join(axes) or 'none'})",
                    path + ("exclude", index, key),
                )
        combos = [combo for combo in combos if not _matches(combo, entry)]
    for include_index, entry in enumerate(includes):
        for exclude_index, excluded in enumerate(excludes):
            if _matches(entry, excluded):
                raise error(
                    f"include entry {include_index} is removed again by exclude entry "
                    f"{exclude_index} ({_label(excluded)}): drop one of the two",
                    path + ("include", include_index),
                )
    for entry in includes:
        extended = False
        for combo in combos:
            if all(combo.get(key, value) == value for key, value in entry.items() if key in axes):
                original = {key: combo[key] for key in axes}
                combo.update({k: v for k, v in entry.items() if k not in original})
                extended = True
        if not extended:
            combos.append(dict(entry))
    if not combos:
        raise error("the matrix has no combinations left after exclude", path)
    return combos


def variant_id(stage_id: str, combo: dict[str, Any]) -> str:
    """Stable id of one expanded stage, e.g. `quantize[method=gptq,group_size=64]`."""
    return f"{stage_id}[{_label(combo)}]"


def _label(combo: dict[str, Any]) -> str:
    return ",".join(f"{key}={_scalar(value)}" for key, value in combo.items())


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def _matches(combo: dict[str, Any], entry: dict[str, Any]) -> bool:
    return all(key in combo and combo[key] == value for key, value in entry.items())


def _entries(
    spec: dict[str, Any], key: str, positions: Positions, path: KeyPath
) -> list[dict[str, Any]]:
    entries = spec.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
        raise RecipeError(
            f"matrix {key} is a list of mappings (axis: value)",
            positions.value_mark(path + (key,)),
            format_path(path + (key,)),
        )
    return entries


def expand_stages(
    model: RecipeModel,
    positions: Positions,
    order: list[str],
    needs: dict[str, list[str]],
    classes: dict[str, type[Stage]],  # type: ignore[type-arg]
    configs: dict[str, dict[str, Any]],
    errors: list[RecipeError],
) -> dict[str, PlannedStage]:
    """One PlannedStage per stage, or per combination of a matrix stage (and of the stages
    that need it). Problems go to `errors`."""
    variants: dict[str, list[dict[str, Any]]] = {}
    planned: dict[str, PlannedStage] = {}
    for stage_id in order:
        spec = model.stages[stage_id]
        at: KeyPath = ("stages", stage_id, "matrix")
        inherited = [variants[n] for n in needs[stage_id] if variants[n] != [{}]]
        try:
            if spec.matrix is not None:
                if inherited:
                    raise RecipeError(
                        "a matrix stage cannot need another matrix stage; it already runs "
                        "once per upstream combination",
                        positions.value_mark(at),
                        format_path(at),
                    )
                combos = expand_matrix(spec.matrix, positions, at)
            elif inherited:
                if any(other != inherited[0] for other in inherited):
                    raise RecipeError(
                        "needs two matrix stages with different combinations",
                        positions.value_mark(("stages", stage_id, "needs")),
                        format_path(("stages", stage_id, "needs")),
                    )
                combos = inherited[0]
            else:
                combos = [{}]
        except RecipeError as exc:
            errors.append(exc)
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
                config = _apply_matrix(positions, stage_id, config, combo, errors)
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
                resources=spec.resources,
                retries=spec.retries,
            )
    return planned


def _apply_matrix(
    positions: Positions,
    stage_id: str,
    config: dict[str, Any],
    combo: dict[str, Any],
    errors: list[RecipeError],
) -> dict[str, Any]:
    def lookup(expression: str) -> Any:
        expression = expression.strip()
        if expression.startswith("matrix."):
            return lookup_in(combo, expression[len("matrix.") :], "matrix")
        raise Deferred

    try:
        applied: dict[str, Any] = interpolate(
            config, lookup, positions, ("stages", stage_id, "with"), unescape=False
        )
        return applied
    except RecipeError as exc:
        errors.append(exc)
        return config
