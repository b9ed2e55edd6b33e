"""`matrix:` on a stage: a cartesian product with include/exclude, with GitHub Actions semantics."""

from __future__ import annotations

import itertools
from typing import Any

from gcupipe.errors import RecipeError
from gcupipe.recipe.source import KeyPath, Positions, format_path


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


def _entries(spec: dict[str, Any], key: str, positions: Positions, path: KeyPath) -> list[dict]:
    entries = spec.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) and e for e in entries):
        raise RecipeError(
            f"matrix {key} is a list of mappings (axis: value)",
            positions.value_mark(path + (key,)),
            format_path(path + (key,)),
        )
    return entries
