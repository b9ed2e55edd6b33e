"""Load any model directory gcupipe deals with (float, modelslim, gcu, compressed-tensors) as a
runnable torch model, through the format readers of gcupipe.formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError


@dataclass
class LoadedModel:
    """A runnable model and what it was built from."""

    model: Any
    format: str  # float | modelslim | gcu | compressed-tensors
    quantized_linears: int
    kv_cache_layers: int
    vocab_size: int


def detect(model_dir: Path) -> str:
    """The format's name, or "float" for a plain checkpoint."""
    from gcupipe.formats.registry import format_name

    return format_name(model_dir)


def load_model(model_dir: Path | str, dtype: str = "float32") -> LoadedModel:
    """The model of `model_dir`: float checkpoints through transformers, quantized ones through
    their format reader and the runtime's target-kernel linears."""
    from gcupipe.runtime.model import build_model, load_config, load_float_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise StageError(f"{model_dir} has no config.json: is it a model directory?")
    kind = detect(model_dir)
    if kind == "float":
        model = load_float_model(model_dir, dtype)
        return LoadedModel(model, "float", 0, 0, int(model.config.vocab_size))
    from gcupipe.formats.registry import read_quantized

    checkpoint = read_quantized(model_dir)
    config = load_config(model_dir)
    model = build_model(
        config, checkpoint.float_tensors, checkpoint.linears, checkpoint.kv_scales, dtype=dtype
    )
    return LoadedModel(
        model,
        checkpoint.format,
        len(checkpoint.linears),
        len(checkpoint.kv_scales),
        int(config.vocab_size),
    )
