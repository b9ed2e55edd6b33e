"""Plan-time checks on a model directory that already exists (no tensor data is read)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gcupipe.quant.archs import ARCHS
from gcupipe.quant.checkpoint import CheckpointReader, layer_relative, load_raw_config


def linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Full module name -> (out_features, in_features) of every quantizable linear."""
    from safetensors import safe_open

    raw = load_raw_config(model_dir)
    arch = ARCHS.get(str(raw.get("model_type")))
    reader = CheckpointReader(model_dir)
    shapes: dict[str, tuple[int, int]] = {}
    by_file: dict[str, list[str]] = {}
    for name, file in reader.weight_map.items():
        if not name.endswith(".weight"):
            continue
        rel = layer_relative(name)
        module = name[: -len(".weight")]
        if rel is not None and arch is not None and arch.is_linear(rel[1][: -len(".weight")]):
            by_file.setdefault(file, []).append(module)
        elif module == "lm_head":
            by_file.setdefault(file, []).append(module)
    for file, modules in by_file.items():
        with safe_open(str(model_dir / file), "pt") as handle:
            for module in modules:
                shape = handle.get_slice(f"{module}.weight").get_shape()
                shapes[module] = (int(shape[0]), int(shape[1]))
    return shapes


def group_size_problems(model_dir: Path, resolve: Callable[[str], Any]) -> list[str]:
    """One message per input size that a layer's group size does not divide, naming the
    layers and the group sizes that would fit every quantized layer."""
    try:
        shapes = linear_shapes(model_dir)
    except (OSError, KeyError, ValueError):
        return []  # an unreadable directory is reported by the run itself
    bad: dict[tuple[int, int], list[str]] = {}
    sizes = []
    for module, (_n, k) in shapes.items():
        spec = resolve(module)
        if spec is None or not spec.group_size:
            continue
        sizes.append(k)
        if k % spec.group_size:
            bad.setdefault((spec.group_size, k), []).append(module)
    if not bad:
        return []
    common = math.gcd(*sizes)
    fits = [g for g in (32, 64, 128, 256) if common % g == 0]
    messages = []
    for (group, k), modules in sorted(bad.items()):
        shown = ", ".join(modules[:3]) + (
            f" and {len(modules) - 3} more" if len(modules) > 3 else ""
        )
        messages.append(
            f"group size {group} does not divide input size {k} of {len(modules)} layer(s): "
            f"{shown}; group sizes that fit every layer: "
            f"{', '.join(map(str, fits)) or 'none of 32/64/128/256'} (or 0 = per channel)"
        )
    return messages
