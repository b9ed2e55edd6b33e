"""The recipe language: YAML with positions, extends/include, ${...}, --set, matrix, validation."""

from gcupipe.recipe.loader import load_recipe
from gcupipe.recipe.planned import PlannedStage, Recipe
from gcupipe.recipe.resolve import resolve_stage_config

__all__ = ["PlannedStage", "Recipe", "load_recipe", "resolve_stage_config"]
