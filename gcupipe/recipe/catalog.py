"""`gcupipe recipes`: the recipes and fragments installed packages provide.

A package declares them with one entry point per package directory of YAML files:

    [project.entry-points."gcupipe.recipes"]
    acme-policy = "acme_policy"

Every `.yaml`/`.yml` the distribution installs below that directory is listed with the
reference a recipe uses for it (`pkg:DIST/PATH`) and its description: the first line of the
file's leading comment. Files are found through the distribution's record, never by import.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path, PurePosixPath

from gcupipe.recipe.references import PACKAGE_PREFIX

GROUP = "gcupipe.recipes"


@dataclass(frozen=True)
class ProvidedRecipe:
    reference: str  # what extends:/include: take
    description: str


def provided_recipes() -> list[ProvidedRecipe]:
    found = []
    for point in entry_points(group=GROUP):
        distribution = point.dist
        if distribution is None:
            continue
        directory = PurePosixPath(point.value.replace(".", "/"))
        for entry in distribution.files or []:
            relative = PurePosixPath(str(entry))
            if relative.suffix not in (".yaml", ".yml") or directory not in relative.parents:
                continue
            path = Path(str(entry.locate()))
            found.append(
                ProvidedRecipe(
                    f"{PACKAGE_PREFIX}{distribution.name}/{relative}", _description(path)
                )
            )
    return sorted(found, key=lambda recipe: recipe.reference)


def _description(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("yaml-language-server:"):
            return text
    return ""
