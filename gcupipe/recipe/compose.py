"""`extends:` and `include:`: recipes built from shared files, deep-merged with their positions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.errors import Mark, RecipeError
from gcupipe.recipe.references import LOCAL, ComposedFile, Origin, UnresolvedReference, resolve
from gcupipe.recipe.source import KeyPath, Positions, format_path, read_yaml_file


@dataclass
class Composed:
    """A recipe with everything it extends and includes merged in, and the files it took."""

    data: dict[str, Any]
    positions: Positions
    files: list[ComposedFile]  # the recipe file first


def deep_merge(
    target: dict[str, Any],
    target_positions: Positions,
    source: dict[str, Any],
    source_positions: Positions,
    prefix: KeyPath = (),
    *,
    over: bool = True,
) -> None:
    """Merge `source` over `target` in place: mappings merge key by key, anything else
    (lists included) is replaced whole, and the positions follow the values that win.
    With `over=False` the target wins instead and `source` only fills in what it lacks."""
    for key, value in source.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            if over and path in source_positions.keys:
                target_positions.keys[path] = source_positions.keys[path]
            deep_merge(target[key], target_positions, value, source_positions, path, over=over)
            continue
        if not over and key in target:
            continue
        target[key] = value
        target_positions.drop(path)
        for table_name in ("keys", "values"):
            table = getattr(source_positions, table_name)
            mine = getattr(target_positions, table_name)
            for other_path, mark in table.items():
                if other_path[: len(path)] == path:
                    mine[other_path] = mark


def compose(path: Path) -> Composed:
    """Load a recipe file with everything it extends and includes merged in.

    Precedence (later wins): extended files in order < included fragments in order < the file.
    Key order: the extended files' keys, then the file's own, then keys only fragments add, so
    a fragment mounted at `stages.<id>.with` never moves that stage ahead of the ones the
    file declares before it."""
    files: list[ComposedFile] = []
    data, positions = _load(path, LOCAL, (), files)
    return Composed(data, positions, files)


def _load(
    path: Path, origin: Origin, chain: tuple[Path, ...], files: list[ComposedFile]
) -> tuple[dict[str, Any], Positions]:
    display = origin.name_of(path)
    data, positions, sha256 = read_yaml_file(path, display)
    if all(known.name != display for known in files):
        files.append(ComposedFile(display, origin.version, sha256))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"a recipe must be a mapping of keys (version, name, stages, ...), not a {_kind(data)}",
            positions.value_mark(()),
        )
    merged: dict[str, Any] = {}
    merged_positions = Positions()
    merged_positions.values[()] = positions.values.get((), Mark(display, 1, 1))
    chain = chain + (path.resolve(),)

    for reference, _ in _references(data, positions, "extends"):
        base, base_positions = _load_reference(path, origin, reference, chain, positions, files)
        deep_merge(merged, merged_positions, base, base_positions)
    fragments: dict[str, Any] = {}
    fragments_positions = Positions()
    for reference, at in _references(data, positions, "include"):
        fragment, fragment_positions = _load_reference(
            path, origin, reference, chain, positions, files
        )
        if at:
            fragment, fragment_positions = _mount(fragment, fragment_positions, at)
        deep_merge(fragments, fragments_positions, fragment, fragment_positions)

    own = {key: value for key, value in data.items() if key not in ("extends", "include")}
    positions.drop(("extends",))
    positions.drop(("include",))
    positions.keys.pop(("extends",), None)
    positions.keys.pop(("include",), None)
    deep_merge(own, positions, fragments, fragments_positions, over=False)
    deep_merge(merged, merged_positions, own, positions)
    return merged, merged_positions


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__
    )


def _references(
    data: dict[str, Any], positions: Positions, key: str
) -> list[tuple[tuple[str, KeyPath], tuple[str, ...]]]:
    """The files named by `extends:`/`include:` as ((file, key path of the entry), mount point)."""
    value = data.get(key)
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    found = []
    for index, item in enumerate(items):
        item_path: KeyPath = (key, index) if isinstance(value, list) else (key,)
        at: tuple[str, ...] = ()
        if key == "include" and isinstance(item, dict):
            unknown = set(item) - {"file", "at"}
            if unknown or "file" not in item:
                raise RecipeError(
                    "an include entry is a file path or a mapping {file: PATH, at: KEY.PATH}",
                    positions.value_mark(item_path),
                    format_path(item_path),
                )
            at = tuple(str(item.get("at") or "").split(".")) if item.get("at") else ()
            item = item["file"]
            item_path = item_path + ("file",)
        if not isinstance(item, str) or not item:
            raise RecipeError(
                f"`{key}` takes a file path or a list of file paths",
                positions.value_mark(item_path),
                format_path(item_path),
            )
        found.append(((item, item_path), at))
    return found


def _load_reference(
    path: Path,
    origin: Origin,
    reference: tuple[str, KeyPath],
    chain: tuple[Path, ...],
    positions: Positions,
    files: list[ComposedFile],
) -> tuple[dict[str, Any], Positions]:
    name, item_path = reference
    key = str(item_path[0])
    mark = positions.value_mark(item_path)
    try:
        target, target_origin = resolve(name, path.parent, origin)
    except UnresolvedReference as exc:
        raise RecipeError(str(exc), mark, format_path(item_path)) from None
    if target in chain:
        cycle = " -> ".join(origin.name_of(p) for p in chain + (target,))
        raise RecipeError(f"{key} cycle: {cycle}", mark, format_path(item_path))
    if not target.is_file():
        raise RecipeError(
            f"{key} names a file that does not exist: {target_origin.name_of(target)}",
            mark,
            format_path(item_path),
        )
    return _load(target, target_origin, chain, files)


def _mount(
    fragment: dict[str, Any], positions: Positions, at: tuple[str, ...]
) -> tuple[dict[str, Any], Positions]:
    mounted: dict[str, Any] = fragment
    for key in reversed(at):
        mounted = {key: mounted}
    moved = Positions()
    moved.update(positions, at)
    return mounted, moved
