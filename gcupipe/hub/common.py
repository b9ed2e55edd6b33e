"""What every hub source shares: the fetch request, its hash-mismatch error, a progress sink."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gcupipe.errors import StageError


@dataclass(frozen=True)
class HubFetch:
    """One snapshot to fetch from a hub, already resolved from config and environment."""

    repo_id: str
    revision: str
    cache_dir: Path
    endpoint: str | None
    token: str | None
    allow_patterns: list[str] | None
    ignore_patterns: list[str] | None
    offline: bool
    max_workers: int = 4
    repo_type: str = "model"
    """"model" or "dataset": the hubs keep the two kinds in separate namespaces."""


Log = Callable[[str], None]


def unsafe_path(name: str) -> str | None:
    """Why a file name from a hub listing cannot be written under a snapshot directory (it is
    absolute or climbs out with `..`), or None. Some hub clients write such names as given."""
    if not name:
        return "an empty name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if "\\" in name:
        return "a backslash in the path"
    if ".." in name.split("/"):
        return "a '..' segment"
    return None


def refuse_unsafe_paths(names: list[str], where: str) -> None:
    """StageError naming the first listed file that would be written outside the cache."""
    for name in names:
        why = unsafe_path(name)
        if why is not None:
            raise StageError(
                f"{where} lists {name[:200]!r} ({why}): it would be written outside the "
                "cache, so nothing was downloaded; ask the repository owner to rename it"
            )


@dataclass(frozen=True)
class HubPublish:
    """One folder to publish to a hub repository, resolved from config and environment."""

    repo_id: str
    revision: str
    endpoint: str | None
    token: str | None
    private: bool
    commit_message: str


@dataclass(frozen=True)
class Published:
    """What a publish left on the hub: the commit holding the files, and whether it is new."""

    url: str
    commit: str | None
    committed: bool


def unchanged(local: dict[str, str], remote: dict[str, str]) -> bool:
    """Whether the repository already holds every local file with the same hash (files only
    the repository has, such as .gitattributes, do not count)."""
    return all(remote.get(path) == digest for path, digest in local.items())


class HashMismatch(Exception):
    """A fetched file's bytes do not match the hash the hub published for it."""

    def __init__(self, path: str, expected: str, actual: str):
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(f"Hash mismatch for {path}: expected {expected[:16]}, got {actual[:16]}")


class NotFound(Exception):
    """The hub says 404; `what` is "model", "dataset", "revision" or "file" when the source
    could tell."""

    def __init__(self, what: str, detail: str = ""):
        self.what = what
        super().__init__(f"{what} not found" + (f": {detail}" if detail else ""))


class ByteProgress(Protocol):
    def advance(self, amount: float = 1.0) -> None: ...
    def set_total(self, total: float) -> None: ...


class ProgressSink:
    """Thread-safe bytes counter in front of a gcupipe progress bar; the clients download
    several files at once from worker threads."""

    def __init__(self, bar: ByteProgress):
        self._bar = bar
        self._lock = threading.Lock()
        self.total = 0

    def add_total(self, size: int) -> None:
        with self._lock:
            self.total += max(size, 0)
            self._bar.set_total(self.total)

    def set_total(self, total: int) -> None:
        with self._lock:
            if total != self.total:
                self.total = total
                self._bar.set_total(total)

    def advance(self, size: float) -> None:
        with self._lock:
            self._bar.advance(size)
