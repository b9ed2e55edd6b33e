"""Human documentation of registered stages, generated from their Config and Outputs models."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from rich.console import Group
from rich.table import Table
from rich.text import Text

from gcupipe.plugins import PluginLoadError
from gcupipe.stages.registry import STAGES


def _fields(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of a model's fields, as the recipe spells them."""
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        default = "required" if name in required else json.dumps(prop.get("default"), default=str)
        rows.append((name, _type(prop), default, prop.get("description", "")))
    return rows


def _type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_type(p) for p in prop["anyOf"])
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if prop.get("type") == "array":
        return f"list[{_type(prop.get('items', {}))}]"
    return str(prop.get("type", "any"))


def _doc(stage_class: type) -> str:
    return (stage_class.__doc__ or "").strip()


def stage_summaries() -> Table:
    table = Table(title="registered stages", title_justify="left")
    for column in ("uses", "version", "what it does"):
        table.add_column(column)
    for name in STAGES.names():
        try:
            stage_class = STAGES.get(name)
        except PluginLoadError as exc:
            table.add_row(name, "-", Text(f"broken plugin: {exc}", style="red"))
            continue
        table.add_row(
            name,
            stage_class.version,
            _doc(stage_class).splitlines()[0] if _doc(stage_class) else "",
        )
    return table


def describe_stage(name: str) -> Group:
    stage_class = STAGES.get(name)
    parts: list[Any] = [
        Text(f"uses: {name} (version {stage_class.version})", style="bold"),
        Text(_doc(stage_class)),
    ]
    for title, model in (("with:", stage_class.Config), ("outputs:", stage_class.Outputs)):
        table = Table(title=title, title_justify="left")
        for column in ("key", "type", "default", "description"):
            table.add_column(column)
        for row in _fields(model):
            table.add_row(*row)
        parts.append(table)
    return Group(*parts)


def stage_reference_markdown() -> str:
    """The README's stage reference, generated so it cannot drift from the code."""
    lines = []
    for name in STAGES.names():
        stage_class = STAGES.get(name)
        lines += [
            f"### `uses: {name}`",
            "",
            _doc(stage_class),
            "",
            "| `with:` key | type | default | description |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{n}` | {t} | {d} | {desc} |".replace("\n", " ")
            for n, t, d, desc in _fields(stage_class.Config)
        ]
        lines += ["", "| output | type | description |", "|---|---|---|"]
        lines += [f"| `{n}` | {t} | {desc} |" for n, t, _, desc in _fields(stage_class.Outputs)]
        lines.append("")
    return "\n".join(lines)
