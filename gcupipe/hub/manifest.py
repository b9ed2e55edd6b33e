"""File hashes and the manifest every download writes: each file's path, size and sha256."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from gcupipe.checksums import sha256_file

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
"""Weight files that torch unpickles: loading one can run arbitrary code."""

WEIGHT_PATTERNS = ("*.safetensors", *PICKLE_PATTERNS)
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    size: int
    sha256: str


def git_blob_sha1_file(path: Path) -> str:
    """The git object id of a file; what a hub reports for files not stored in LFS."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(model_dir: Path) -> list[str]:
    """Every file below `model_dir` (following links), as sorted posix paths, skipping the
    clients' bookkeeping directories (`.cache`, `.locks`, `._____temp`...)."""
    files = []
    for path in model_dir.rglob("*"):
        relative = path.relative_to(model_dir)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file():
            files.append(relative.as_posix())
    return sorted(files)


def matches(path: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """fnmatch on the whole relative path, as both hub clients match allow/ignore patterns."""
    return any(fnmatch.fnmatch(path, pattern) for pattern in patterns)


def select(
    files: list[str],
    allow_patterns: list[str] | None,
    ignore_patterns: list[str] | None,
) -> list[str]:
    """The files a download config asks for (a cache snapshot may hold more from other runs)."""
    chosen = [f for f in files if allow_patterns is None or matches(f, allow_patterns)]
    return [f for f in chosen if not (ignore_patterns and matches(f, ignore_patterns))]


def build_manifest(
    model_dir: Path, known_sha256: dict[str, str] | None = None
) -> list[ManifestEntry]:
    """Size and sha256 of every file; `known_sha256` skips re-hashing files just verified."""
    known = known_sha256 or {}
    return [
        ManifestEntry(
            rel, (model_dir / rel).stat().st_size, known.get(rel) or sha256_file(model_dir / rel)
        )
        for rel in model_files(model_dir)
    ]


def write_manifest(
    path: Path, entries: list[ManifestEntry], *, source: str, model_dir: Path, hub_checked: int
) -> None:
    """Write the manifest json. `hub_checked` counts files whose hash the hub vouched for;
    `model_dir` is recorded relative to the manifest, so the stage directory can move."""
    payload = {
        "source": source,
        "model_dir": os.path.relpath(model_dir, path.parent),
        "hub_hashes_checked": hub_checked,
        "total_bytes": sum(entry.size for entry in entries),
        "files": [asdict(entry) for entry in entries],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
