"""YAML loaded with the position of every key and value, so errors name file:line:col."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gcupipe.errors import Mark, RecipeError

KeyPath = tuple[str | int, ...]


@dataclass
class Positions:
    """Where each key path of a (merged) document came from."""

    keys: dict[KeyPath, Mark] = field(default_factory=dict)
    values: dict[KeyPath, Mark] = field(default_factory=dict)

    def update(self, other: Positions, prefix: KeyPath = ()) -> None:
        for path, mark in other.keys.items():
            self.keys[prefix + path] = mark
        for path, mark in other.values.items():
            self.values[prefix + path] = mark

    def drop(self, prefix: KeyPath) -> None:
        """Forget everything under `prefix` (a merge replaced that subtree)."""
        size = len(prefix)
        for table in (self.keys, self.values):
            for path in [p for p in table if p[:size] == prefix and len(p) > size]:
                del table[path]

    def value_mark(self, path: KeyPath) -> Mark | None:
        """The mark of the value at `path`, or of the nearest enclosing value that has one."""
        for end in range(len(path), -1, -1):
            mark = self.values.get(path[:end])
            if mark is not None:
                return mark
        return None

    def key_mark(self, path: KeyPath) -> Mark | None:
        """The mark of the key at `path` (falling back to the value marks)."""
        return self.keys.get(path) or self.value_mark(path)


def format_path(path: KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


class _Constructor(yaml.constructor.SafeConstructor):
    pass


def _mark(source: str, yaml_mark: yaml.Mark) -> Mark:
    return Mark(source, yaml_mark.line + 1, yaml_mark.column + 1)


_UNCLOSED = {
    "while parsing a flow mapping": "the flow mapping '{'",
    "while parsing a flow sequence": "the flow sequence '['",
    "while scanning a quoted scalar": "the quoted string",
}


def yaml_error(exc: yaml.MarkedYAMLError, text: str, source: str) -> RecipeError:
    """A PyYAML error at its cause. An unclosed '{', '[' or quote is found only where the parser
    gives up, often lines later or at the end of the file: the error points at where it was
    opened, with the parser's own complaint as a note at the place it gave up."""
    problem, context = exc.problem or "", exc.context or ""
    here, opened = exc.problem_mark, exc.context_mark
    unclosed = _UNCLOSED.get(context)
    if here is not None:
        runaway = _runaway_quote(text, here)
        if runaway is not None and (unclosed is None or opened is None or opened.line == here.line):
            unclosed, opened = "the quoted string", runaway
    if unclosed and opened is not None and here is not None and here.line > opened.line:
        note = f"{_mark(source, here)}: note: {problem or 'the parser gave up here'}"
        return RecipeError(
            f"invalid YAML: {unclosed} opened here is never closed\n{note}", _mark(source, opened)
        )
    message = f"invalid YAML: {problem or context or 'invalid YAML'}"
    if unclosed and opened is not None and here is not None:
        message += f"\n{_mark(source, opened)}: note: {unclosed} opened here"
    mark = here or opened
    return RecipeError(message, _mark(source, mark) if mark else Mark(source, 1, 1))


def _runaway_quote(text: str, error: yaml.Mark) -> yaml.Mark | None:
    """Where a quoted string starts that runs over several lines right up to `error`: a missing
    closing quote swallows the lines after it until the next quote character."""
    last = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.index >= error.index:
                break
            last = token
    except yaml.YAMLError:
        pass
    quoted = isinstance(last, yaml.ScalarToken) and last.style in ('"', "'")
    if quoted and last is not None and last.end_mark.line > last.start_mark.line:
        return last.start_mark  # type: ignore[no-any-return]
    return None


def parse_yaml(text: str, source: str) -> tuple[Any, Positions]:
    """Parse one YAML document into plain Python data plus the positions of its keys/values."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        raise yaml_error(exc, text, source) from None
    except yaml.YAMLError as exc:  # reader errors (bad bytes) carry no mark
        raise RecipeError(f"invalid YAML: {exc}", Mark(source, 1, 1)) from None
    positions = Positions()
    if node is None:
        return None, positions
    constructor = _Constructor()
    data = _convert(node, (), source, constructor, positions)
    return data, positions


def _convert(
    node: yaml.Node, path: KeyPath, source: str, constructor: _Constructor, positions: Positions
) -> Any:
    positions.values[path] = _mark(source, node.start_mark)
    if isinstance(node, yaml.MappingNode):
        try:
            constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as exc:
            raise RecipeError(
                f"invalid YAML merge: {exc.problem}", _mark(source, node.start_mark)
            ) from None
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node, source, constructor)
            if not isinstance(key, str | int | float | bool) or isinstance(key, bool):
                raise RecipeError(
                    "mapping keys must be plain strings", _mark(source, key_node.start_mark)
                )
            key = str(key)
            if key in result:
                raise RecipeError(
                    f"duplicate key '{key}'",
                    _mark(source, key_node.start_mark),
                    format_path(path + (key,)),
                )
            positions.keys[path + (key,)] = _mark(source, key_node.start_mark)
            result[key] = _convert(value_node, path + (key,), source, constructor, positions)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [
            _convert(item, path + (index,), source, constructor, positions)
            for index, item in enumerate(node.value)
        ]
    return _scalar(node, source, constructor)


def _scalar(node: yaml.Node, source: str, constructor: _Constructor) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise RecipeError("mapping keys must be plain strings", _mark(source, node.start_mark))
    try:
        return constructor.construct_object(node, deep=True)
    except (yaml.constructor.ConstructorError, ValueError, OverflowError) as exc:
        raise RecipeError(f"invalid YAML value: {exc}", _mark(source, node.start_mark)) from None


def read_yaml_file(path: Path, display: str) -> tuple[Any, Positions, str]:
    """Read and parse a recipe file; `display` is how the file is named in messages. Also
    returns the sha256 of the bytes read (the lock records every composed file by it)."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"file not found: {display}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read {display}: {exc}") from None
    return (*parse_yaml(text, display), hashlib.sha256(raw).hexdigest())
