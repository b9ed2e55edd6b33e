"""`gcupipe show`: the composed recipe, interpolated as far as it can be before a run, with the
file:line each value was written at (extends < include < recipe < environment < --set)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from gcupipe.errors import RecipeError
from gcupipe.recipe.interpolate import Deferred, environment_lookup, interpolate, lookup_in
from gcupipe.recipe.planned import Recipe
from gcupipe.recipe.source import KeyPath, format_path
from gcupipe.secrets import is_secret_name


def shown_document(recipe: Recipe, environ: Mapping[str, str]) -> dict[str, Any]:
    """The recipe after composition and overrides, `${vars.*}` and `${env:*}` filled in; what
    only a run knows (`${stages.*}`, `${matrix.*}`), unset variables and secrets stay as
    written."""
    from_environment = environment_lookup(environ)

    def lookup(expression: str) -> Any:
        expression = expression.strip()
        if expression.startswith("vars."):
            return lookup_in(recipe.vars, expression[len("vars.") :], "vars")
        name = expression[len("env:") :].partition(",")[0].strip()
        if expression.startswith("env:") and not is_secret_name(name):
            try:
                return from_environment(expression)
            except RecipeError:
                raise Deferred from None
        raise Deferred

    shown: dict[str, Any] = interpolate(
        recipe.document, lookup, recipe.positions, (), unescape=False
    )
    return shown


def origins(recipe: Recipe, document: dict[str, Any]) -> dict[str, str]:
    """Key path -> where its value was written, for every value that is not a mapping."""
    found: dict[str, str] = {}

    def walk(value: Any, path: KeyPath) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(item, path + (key,))
        elif isinstance(value, list) and value and not all(_is_scalar(v) for v in value):
            for index, item in enumerate(value):
                walk(item, path + (index,))
        else:
            mark = recipe.positions.value_mark(path)
            found[format_path(path)] = str(mark) if mark else "?"

    walk(document, ())
    return found


def annotated_yaml(recipe: Recipe, environ: Mapping[str, str]) -> str:
    """The shown document as YAML, every value followed by `# file:line:col`."""
    document = shown_document(recipe, environ)
    where = origins(recipe, document)
    lines: list[str] = []

    def emit(value: Any, path: KeyPath, indent: str, lead: str) -> None:
        if isinstance(value, dict) and value:
            for number, (key, item) in enumerate(value.items()):
                prefix = indent + (lead if number == 0 else " " * len(lead)) + f"{_scalar(key)}:"
                _entry(prefix, item, path + (key,), indent + " " * len(lead) + "  ")
        elif isinstance(value, list) and value and not all(_is_scalar(v) for v in value):
            for index, item in enumerate(value):
                if isinstance(item, dict) and item:
                    emit(item, path + (index,), indent, "- ")
                else:
                    _entry(indent + "-", item, path + (index,), indent + "  ")

    def _entry(prefix: str, item: Any, path: KeyPath, deeper: str) -> None:
        dotted = format_path(path)
        if dotted in where:
            lines.append(f"{prefix} {_scalar(item)}  # {where[dotted]}")
        else:
            lines.append(prefix)
            emit(item, path, deeper, "")

    emit(document, (), "", "")
    return "\n".join(lines) + "\n"


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list) or not value


def _scalar(value: Any) -> str:
    """One value in YAML flow style (a list of plain values on one line)."""
    text: str = yaml.safe_dump([value], default_flow_style=True, width=2**31, sort_keys=False)
    return text.strip()[1:-1]
