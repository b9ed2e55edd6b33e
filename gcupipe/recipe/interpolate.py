"""`${...}` interpolation: vars, environment, matrix values, upstream outputs; `$${` escapes."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gcupipe.errors import RecipeError
from gcupipe.recipe.source import KeyPath, Positions, format_path
from gcupipe.secrets import is_secret_name, register_secret

# `$${` is an escape; `${expr}` an expression (no nesting).
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_STAGE_REF = re.compile(r"^stages\.([A-Za-z_][\w-]*)\.outputs\.([A-Za-z_]\w*)$")


class Deferred(Exception):
    """The expression can only be resolved later (an upstream stage has not run yet)."""


@dataclass(frozen=True)
class StageRef:
    stage_id: str
    output: str


def parse_stage_ref(expression: str) -> StageRef | None:
    match = _STAGE_REF.match(expression.strip())
    return StageRef(match.group(1), match.group(2)) if match else None


def find_expressions(value: Any) -> list[str]:
    """Every `${...}` expression inside `value` (escapes excluded)."""
    found: list[str] = []
    if isinstance(value, str):
        found.extend(m.group(1) for m in _TOKEN.finditer(value) if m.group(1) is not None)
    elif isinstance(value, dict):
        for item in value.values():
            found.extend(find_expressions(item))
    elif isinstance(value, list):
        for item in value:
            found.extend(find_expressions(item))
    return found


Lookup = Callable[[str], Any]


def interpolate(
    value: Any, lookup: Lookup, positions: Positions, path: KeyPath, *, unescape: bool
) -> Any:
    """Replace every `${expr}` in `value` by `lookup(expr)`.

    A string that is exactly one expression takes the looked-up value with its type (a number
    stays a number); otherwise values are formatted into the string. `lookup` raises Deferred to
    leave an expression for later, or RecipeError (re-raised with this value's position).
    `unescape` turns `$${` into `${` — done once, on the last pass."""
    if isinstance(value, dict):
        return {
            key: interpolate(item, lookup, positions, path + (key,), unescape=unescape)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [
            interpolate(item, lookup, positions, path + (index,), unescape=unescape)
            for index, item in enumerate(value)
        ]
    if not isinstance(value, str) or "$" not in value:
        return value

    def resolve(expression: str) -> Any:
        try:
            return lookup(expression)
        except RecipeError as exc:
            raise RecipeError(exc.message, positions.value_mark(path), format_path(path)) from None

    whole = _TOKEN.fullmatch(value)
    if whole and whole.group(1) is not None:
        try:
            return resolve(whole.group(1))
        except Deferred:
            return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "${" if unescape else match.group(0)
        try:
            resolved = resolve(match.group(1))
        except Deferred:
            return match.group(0)
        if isinstance(resolved, dict | list):
            raise RecipeError(
                f"'${{{match.group(1)}}}' is a {type(resolved).__name__} and cannot be "
                f"placed inside a string",
                positions.value_mark(path),
                format_path(path),
            )
        return str(resolved)

    return _TOKEN.sub(substitute, value)


def environment_lookup(environ: Mapping[str, str]) -> Callable[[str], Any]:
    """Resolves `env:NAME` and `env:NAME,default`; secret-looking variables are registered."""

    def lookup(expression: str) -> Any:
        name, comma, default = expression[len("env:") :].partition(",")
        name = name.strip()
        if not name:
            raise RecipeError("'${env:}' needs a variable name, e.g. ${env:HF_TOKEN}")
        if name in environ:
            if is_secret_name(name):
                register_secret(environ[name])
            return environ[name]
        if comma:
            return default
        raise RecipeError(
            f"environment variable {name} is not set (give a default with ${{env:{name},value}})"
        )

    return lookup


def lookup_in(mapping: Mapping[str, Any], dotted: str, what: str) -> Any:
    """`a.b` inside nested mappings, with a clear error naming what exists."""
    node: Any = mapping
    walked: list[str] = []
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            from gcupipe.errors import did_you_mean

            known = sorted(node) if isinstance(node, Mapping) else []
            prefix = ".".join([what, *walked])
            raise RecipeError(
                f"'{prefix}.{part}' is not defined{did_you_mean(part, known)}"
                + (f"; defined: {', '.join(known)}" if known else "")
            )
        node = node[part]
        walked.append(part)
    return node
