"""Which stages a run executes: --only, --from, --to and --force, matrix variants included."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gcupipe.errors import UsageError, did_you_mean
from gcupipe.recipe.planned import Recipe


@dataclass
class Selection:
    only: Sequence[str] = ()
    from_stage: str | None = None
    to_stage: str | None = None
    force: Sequence[str] = ()


def select_stages(recipe: Recipe, selection: Selection) -> set[str]:
    """The stage ids a run executes (or reuses from cache); --only/--from/--to narrow it."""
    ids = list(recipe.stages)
    names = set(selection.only) | set(selection.force)
    names |= {n for n in (selection.from_stage, selection.to_stage) if n}
    for name in names:
        if not matching(recipe, name):
            raise UsageError(
                f"no stage '{name}' in recipe '{recipe.name}'{did_you_mean(name, ids)}; "
                f"stages: {', '.join(ids)}"
            )
    chosen = set(ids)
    if selection.only:
        chosen = {sid for name in selection.only for sid in matching(recipe, name)}
    if selection.from_stage:
        chosen &= _closure(recipe, matching(recipe, selection.from_stage), downstream=True)
    if selection.to_stage:
        chosen &= _closure(recipe, matching(recipe, selection.to_stage), downstream=False)
    return chosen


def matching(recipe: Recipe, name: str) -> set[str]:
    """`quantize` selects every matrix variant of it; a full variant id selects one."""
    return {sid for sid, stage in recipe.stages.items() if name in (sid, stage.base_id)}


def _closure(recipe: Recipe, start: set[str], downstream: bool) -> set[str]:
    found = set(start)
    changed = True
    while changed:
        changed = False
        for sid, stage in recipe.stages.items():
            linked = (
                sid not in found and any(n in found for n in stage.needs)
                if downstream
                else sid in found and not set(stage.needs) <= found
            )
            if linked:
                found |= {sid} if downstream else set(stage.needs)
                changed = True
    return found
