"""Content digests of stage outputs and cheap stat fingerprints of inputs and finished outputs."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gcupipe.checksums import sha256_file


def _files(root: Path, exclude: frozenset[str] = frozenset()) -> list[Path]:
    if root.is_file():
        return [root]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names):
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            if relative in exclude or any(relative.startswith(e) for e in exclude if e[-1] == "/"):
                continue
            found.append(path)
    return found


def content_digest(root: Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over every file's relative path and content: equal outputs, equal digest.
    `exclude`: relative paths left out (one ending in "/" leaves out that directory).

    A symbolic link (a download stage links a model out of the hub cache rather than copying
    30 GB) counts by its target's path, size and mtime: reading the target again would double
    the cost of a download that already checked every hash."""
    digest = hashlib.sha256()
    for path in _files(root, exclude):
        relative = path.relative_to(root).as_posix() if root.is_dir() else path.name
        if path.is_symlink():
            target = path.resolve()
            stat = target.stat()
            identity = f"link:{target}:{stat.st_size}:{stat.st_mtime_ns}"
        else:
            identity = sha256_file(path)
        digest.update(f"{relative}\0{identity}\n".encode())
    return digest.hexdigest()


def stat_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over (relative path, size, mtime) of every file below each root: notices edits
    without reading contents, and survives the rename of a finished stage directory."""
    digest = hashlib.sha256()
    for root in paths:
        if not root.exists():
            digest.update(b"missing\n")
            continue
        for path in _files(root):
            stat = path.stat()
            relative = path.relative_to(root).as_posix() if root.is_dir() else ""
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def json_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
