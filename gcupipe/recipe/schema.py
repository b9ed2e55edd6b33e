"""The JSON Schema of recipes: every registered stage's config, discriminated by `uses`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, TypeAdapter, create_model

from gcupipe.plugins import PluginLoadError
from gcupipe.recipe.model import RecipeModel, StageSpec
from gcupipe.stages.registry import STAGES

SCHEMA_ID = "https://gcupipe.dev/schema/recipe.json"


def recipe_schema(on_broken: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """A JSON Schema editors use to complete and check recipes (yaml-language-server).

    A stage plugin that fails to import is left out and reported through `on_broken`, so one
    broken third-party plugin does not take the schema of every other stage with it."""
    variants = []
    for name in STAGES.names():
        try:
            stage_class = STAGES.get(name)
        except PluginLoadError as exc:
            on_broken(str(exc))
            continue
        variants.append(
            create_model(
                f"Stage_{name}",
                __base__=StageSpec,
                __doc__=(stage_class.__doc__ or name).strip().splitlines()[0],
                uses=(Literal[name], Field(description=f"Stage type '{name}'.")),  # type: ignore[arg-type]
                with_=(
                    stage_class.Config,
                    Field(default_factory=dict, alias="with", description="Stage configuration."),
                ),
            )
        )
    stage_union: Any = Annotated[Union[tuple(variants)], Field(discriminator="uses")]  # noqa: UP007
    recipe = create_model(  # type: ignore[call-overload]
        "Recipe",
        __config__=ConfigDict(extra="forbid"),
        __doc__="A gcupipe recipe.",
        **{
            name: (info.annotation, info)
            for name, info in RecipeModel.model_fields.items()
            if name != "stages"
        },
        stages=(dict[str, stage_union], Field(description="Stage id -> stage.")),
        extends=(
            str | list[str] | None,
            Field(default=None, description="Recipe files this one builds on (deep-merged)."),
        ),
        include=(
            list[str | dict[str, str]] | None,
            Field(default=None, description="Fragments merged in: PATH or {file: PATH, at: KEY}."),
        ),
    )
    schema = TypeAdapter(recipe).json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}
