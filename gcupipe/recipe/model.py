"""The recipe's own keys as pydantic models; pydantic errors as file:line:col messages."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gcupipe.errors import RecipeError, did_you_mean
from gcupipe.recipe.source import KeyPath, Positions, format_path
from gcupipe.stages.resources import Resources

STAGE_ID_PATTERN = r"^[A-Za-z_][A-Za-z0-9_-]*$"


class StageSpec(BaseModel):
    """One entry of `stages:`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uses: str = Field(description="Registered stage type (see `gcupipe stages`).")
    needs: list[str] | None = Field(
        default=None,
        description="Stages that must finish first. Absent: the previously declared stage.",
    )
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="The stage's configuration."
    )
    cache: bool = Field(default=True, description="Reuse a previous result when nothing changed.")
    matrix: dict[str, Any] | None = Field(
        default=None,
        description="Run the stage once per combination: axis -> values, plus include/exclude.",
    )
    description: str | None = Field(default=None, description="Free text shown by `plan`.")
    resources: Resources | None = Field(
        default=None,
        description="What the stage needs where it runs (cpus, memory_gb, gpus, custom such as "
        "GCU: 1); replaces the stage type's defaults key by key. Ray places the stage on a node "
        "that has them; locally they are informational.",
    )
    retries: int = Field(
        default=1,
        ge=0,
        description="Times the stage runs again when its worker dies under it (killed, out of "
        "memory, node lost); a stage that fails by itself is not retried.",
    )


class ExecutorSettings(BaseModel):
    """`executor:` of a recipe: where its stages run (`gcupipe run --executor/--jobs/
    --ray-address` win over it; `GCUPIPE__executor__kind=ray` sets it from the environment)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "ray"] = Field(
        default="local",
        description="local: this machine; ray: every stage a Ray task on the cluster.",
    )
    jobs: int = Field(
        default=1,
        ge=1,
        description="local: independent stages run at once, each in its own worker process "
        "(1: one after another in the gcupipe process).",
    )
    ray_address: str | None = Field(
        default=None,
        description="ray: the cluster to join (auto, ray://host:port); none: start Ray on this "
        "machine.",
    )


class RemoteCacheSettings(BaseModel):
    """`cache:` of a recipe: a stage cache shared by every run directory and machine that
    points at it (`GCUPIPE__cache__url=s3://...` sets it from the environment)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        description="Any fsspec URL: s3://bucket/prefix (pip install 'gcupipe[s3]'; endpoint "
        "and credentials from the AWS_* environment as for boto3), gs://..., file:///shared/dir."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, e.g. {endpoint_url: http://minio:9000}; keep "
        "secrets in the environment.",
    )
    push: bool = Field(
        default=True,
        description="Upload the stages this run finishes; false: only reuse what others pushed.",
    )


class RecipeModel(BaseModel):
    """The top level of a recipe, after extends/include have been merged."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = Field(description="Recipe language version; 1.")
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Recipe name; the default run directory is ./runs/<name>.",
    )
    description: str | None = Field(default=None, description="Free text.")
    target: str | None = Field(
        default=None,
        description="Where the model will be served: gcu (vLLM-GCU), ascend (vllm-ascend), "
        "cuda, cpu (upstream vLLM), or a plugin's. Quantize writes for its loaders, validate "
        "judges by them, serve derives its flags from them; a stage's own `target:` wins.",
    )
    vars: dict[str, Any] = Field(
        default_factory=dict, description="Values for ${vars.NAME} interpolation."
    )
    stages: dict[str, StageSpec] = Field(min_length=1, description="Stage id -> stage.")
    executor: ExecutorSettings = Field(
        default_factory=ExecutorSettings, description="Where the stages run."
    )
    cache: RemoteCacheSettings | None = Field(
        default=None,
        description="A remote stage cache: a stage whose cache key some run already pushed is "
        "restored from it instead of run.",
    )

    @field_validator("target")
    @classmethod
    def _known_target(cls, name: str | None) -> str | None:
        from gcupipe.targets.registry import known_target

        return known_target(name)


def validate_model(
    model: type[BaseModel],
    data: Any,
    positions: Positions,
    prefix: KeyPath,
    ignore: Iterable[KeyPath] = (),
) -> BaseModel:
    """`model.model_validate(data)`, with every error mapped to its recipe position.

    Errors located under a path in `ignore` are dropped (values not resolvable yet)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        ignored = list(ignore)
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            if any(loc[: len(skip)] == skip for skip in ignored):
                continue
            problems.append(_problem(model, error, positions, prefix, loc))
        if not problems:
            return model.model_construct(**data) if isinstance(data, dict) else model()
        raise RecipeError.combine(problems) from None


def _problem(
    model: type[BaseModel], error: Any, positions: Positions, prefix: KeyPath, loc: KeyPath
) -> RecipeError:
    path = prefix + _alias_path(model, loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = field_names(_model_at(model, loc[:-1]))
        key = str(loc[-1])
        return RecipeError(
            f"unknown key '{key}'{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}",
            positions.key_mark(path),
            format_path(path),
        )
    if kind == "missing":
        return RecipeError(
            f"missing required key '{loc[-1]}'", positions.value_mark(path[:-1]), format_path(path)
        )
    message = error["msg"]
    got = error.get("input")
    if kind == "value_error":  # our own validators: the message names the value already
        message = message.removeprefix("Value error, ")
    elif not isinstance(got, dict | list) and kind not in ("model_type", "dict_type"):
        message += f" (got {got!r})"
    return RecipeError(message, positions.value_mark(path), format_path(path))


def field_names(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return sorted(info.alias or name for name, info in model.model_fields.items())


def _alias_path(model: type[BaseModel], loc: KeyPath) -> KeyPath:
    """Pydantic locations use field names; recipes use aliases (`with`, not `with_`)."""
    result: list[str | int] = []
    current: Any = model
    for part in loc:
        if _is_model(current) and isinstance(part, str) and part in current.model_fields:
            info = current.model_fields[part]
            result.append(info.alias or part)
            current = info.annotation
        else:
            result.append(part)
            current = _inner(current, part)
        current = _unwrap_model(current)
    return tuple(result)


def _model_at(model: type[BaseModel], loc: KeyPath) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if _is_model(current) and isinstance(part, str) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            current = _inner(current, part)
        current = _unwrap_model(current)
    return current if _is_model(current) else None


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _inner(annotation: Any, part: Any) -> Any:
    """The element type of dict[str, X] / list[X] for one step of a location."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Mapping) and len(args) == 2:
        return args[1]
    if origin in (list, tuple, set) and args:
        return args[0]
    return None


def _unwrap_model(annotation: Any) -> Any:
    """Optional[Model] / Model | None / Annotated[...] -> Model where unambiguous."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap_model(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        candidates = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [c for c in candidates if _is_model(c)]
        if len(candidates) == 1:
            return _unwrap_model(candidates[0])
        if len(models) == 1:
            return models[0]
    return annotation
