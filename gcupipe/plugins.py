"""One door for every kind of plugin: stages, output formats and quantization methods.

Each kind is a `Registry` over one entry-point group (`gcupipe.stages`, `gcupipe.formats`,
`gcupipe.methods`). gcupipe's built-ins are registered in that group too, in pyproject.toml, so a
third-party package adds a stage, a format or a method exactly the way gcupipe adds its own.
`register` adds one in-process (tests, notebooks) without installing anything. Plugins are
imported on first use, so listing names imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from gcupipe.errors import UsageError, did_you_mean

T = TypeVar("T")


class UnknownPlugin(UsageError):
    """No plugin of that kind is registered under the name."""


class PluginLoadError(UsageError):
    """A registered plugin cannot be imported, or is not what its kind requires."""


class Registry(Generic[T]):
    """Named plugins of one kind. `accept(obj)` says whether a loaded object is one."""

    def __init__(self, group: str, kind: str, accept: Callable[[Any], bool], listing: str):
        self.group = group
        self.kind = kind  # "stage type", "format", "quantization method"
        self.accept = accept
        self.listing = listing  # how a user finds the known ones; "{names}" lists them
        self._targets: dict[str, str] | None = None
        self._added: dict[str, Any] = {}
        self._loaded: dict[str, T] = {}

    def _entry_points(self) -> dict[str, str]:
        if self._targets is None:
            self._targets = {ep.name: ep.value for ep in entry_points(group=self.group)}
        return self._targets

    def names(self) -> list[str]:
        return sorted({*self._entry_points(), *self._added})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def register(self, name: str, plugin: T | str) -> None:
        """Add (or replace) `name`: the plugin itself, or a "module:attribute" to import."""
        self._added[name] = plugin
        self._loaded.pop(name, None)

    def unknown_message(self, name: str) -> str:
        listing = self.listing.format(names=", ".join(self.names()))
        return f"unknown {self.kind} '{name}'{did_you_mean(name, self.names())}; {listing}"

    def get(self, name: str) -> T:
        """The plugin registered as `name`: UnknownPlugin (with a did-you-mean) when there is
        none, PluginLoadError when it does not import or is not a plugin of this kind."""
        if name in self._loaded:
            return self._loaded[name]
        plugin: Any = self._added.get(name, self._entry_points().get(name))
        if plugin is None:
            raise UnknownPlugin(self.unknown_message(name))
        target = plugin if isinstance(plugin, str) else None
        if target is not None:
            plugin = import_target(target, self.kind, name)
        if not self.accept(plugin):
            where = f" ({target})" if target else ""
            raise PluginLoadError(f"{self.kind} plugin '{name}'{where} is not a {self.kind}")
        self._loaded[name] = plugin
        return plugin  # type: ignore[no-any-return]


def import_target(target: str, kind: str, name: str) -> Any:
    """The object a "module:attribute" target names; PluginLoadError when it does not import."""
    import importlib

    module, _, attribute = target.partition(":")
    try:
        value: Any = importlib.import_module(module)
        for part in attribute.split(".") if attribute else []:
            value = getattr(value, part)
    except Exception as exc:  # a broken third-party plugin must not look like a gcupipe crash
        raise PluginLoadError(
            f"{kind} plugin '{name}' ({target}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return value
