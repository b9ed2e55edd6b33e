"""Serving targets: what the loaders of each vLLM build accept and read (targets/base.py)."""

from gcupipe.targets.registry import TARGETS, target_for

__all__ = ["TARGETS", "target_for"]
