"""Serving with vLLM: platform detection, argument derivation, offline runs and servers."""

from gcupipe.platform import Platform
from gcupipe.serving.args import Artifact, VllmArgs, derive_quantization, inspect_artifact
from gcupipe.serving.platform import detect_platform

__all__ = [
    "Artifact",
    "Platform",
    "VllmArgs",
    "derive_quantization",
    "detect_platform",
    "inspect_artifact",
]
