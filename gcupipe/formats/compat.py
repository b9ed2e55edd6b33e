"""Which method/format/option combinations a target can load: checked at lint time.

Each rule names the loader that would reject the artifact, so the recipe error says why.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("modelslim", "gcu", "compressed-tensors")


@dataclass(frozen=True)
class Combination:
    method: str
    format: str
    bits: int
    group_size: int
    symmetric: bool
    kv_cache: bool


def incompatibilities(c: Combination) -> list[tuple[str, str]]:
    """(config key, message) for each rule the combination breaks; empty when loadable."""
    problems: list[tuple[str, str]] = []
    if c.format == "gcu":
        if c.method == "w8a8_dynamic":
            problems.append(
                (
                    "format",
                    "the vLLM-GCU `w8a8` loader takes static per-tensor "
                    "input scales only; use method w8a8, or format modelslim / "
                    "compressed-tensors for w8a8_dynamic",
                )
            )
        if c.method == "w8a16" and not c.symmetric:
            problems.append(
                (
                    "symmetric",
                    "the vLLM-GCU 8-bit GPTQ loader accepts symmetric "
                    "weights only (every zero point 128); set symmetric: true",
                )
            )
        if c.bits == 4 and c.group_size and c.group_size % 64:
            problems.append(
                (
                    "group_size",
                    f"vLLM-GCU 4-bit kernels need a group size that is "
                    f"a multiple of 64, got {c.group_size}",
                )
            )
        if c.bits == 4 and c.group_size == 0:
            problems.append(
                (
                    "group_size",
                    "vLLM-GCU 4-bit GPTQ/AWQ needs grouped scales (group_size 64 or a multiple)",
                )
            )
    if c.format == "compressed-tensors" and c.kv_cache:
        problems.append(
            (
                "kv_cache",
                "vLLM reads only fp8 KV-cache scales from "
                "compressed-tensors; use format gcu or modelslim for an int8 KV cache",
            )
        )
    if c.method == "awq" and c.format == "gcu" and c.group_size not in (0, 64):
        problems.append(("group_size", "the vLLM-GCU AWQ path is validated with group size 64"))
    return problems
