"""The accelerators gcupipe builds for, as vLLM platforms: which machine will load the files."""

from __future__ import annotations

import enum


class Platform(enum.StrEnum):
    GCU = "gcu"  # Enflame GCU: vLLM-GCU
    CUDA = "cuda"
    CPU = "cpu"
