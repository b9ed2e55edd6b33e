"""The targets: the `gcupipe.targets` entry-point group (built-ins register there too), and
which one applies when a recipe names none: the one each format was made for."""

from __future__ import annotations

from gcupipe.formats.format import Format
from gcupipe.plugins import Registry
from gcupipe.targets.base import Target

TARGETS: Registry[Target] = Registry(
    "gcupipe.targets", "target", lambda obj: isinstance(obj, Target), "known: {names}"
)


def known_target(name: str | None) -> str | None:
    """`name` unchanged when it is None or a registered target; else ValueError naming them (the
    validator of every `target:` field)."""
    if name is not None and name not in TARGETS:
        raise ValueError(TARGETS.unknown_message(name))
    return name


def target_for(name: str | None, fmt: Format | None = None) -> Target:
    """The target called `name`, else the one the format was made for, else gcu (the product's
    own)."""
    return TARGETS.get(name or (fmt.native_target if fmt is not None else "gcu"))
