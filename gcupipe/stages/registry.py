"""Stage types: the `gcupipe.stages` entry-point group (built-ins register there too)."""

from __future__ import annotations

from gcupipe.plugins import Registry
from gcupipe.stages.base import Stage

STAGES: Registry[type[Stage]] = Registry(  # type: ignore[type-arg]
    "gcupipe.stages",
    "stage type",
    lambda obj: isinstance(obj, type) and issubclass(obj, Stage),
    "`gcupipe stages` lists the registered ones",
)
