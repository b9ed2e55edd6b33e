"""Lazy reads of a safetensors checkpoint (one file or sharded with an index), layer by layer."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcupipe.errors import StageError

if TYPE_CHECKING:
    import torch

_LAYER = re.compile(r"^(?P<prefix>.*?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")


def load_raw_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise StageError(f"{model_dir} has no config.json: is it a model directory?")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def load_config(model_dir: Path) -> Any:
    """transformers config without quantization_config (the source may carry one)."""
    from transformers import AutoConfig

    raw = load_raw_config(model_dir)
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise StageError(f"{model_dir}/config.json has no model_type")
    return AutoConfig.for_model(model_type, **raw)


class CheckpointReader:
    """Tensor names and lazy tensor reads; file handles are opened per read batch and closed by
    `release()`, so memory-mapped pages of finished layers do not accumulate."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(model_dir.glob("*.safetensors"))
            if not files:
                raise StageError(f"{model_dir} has no .safetensors files")
            from safetensors import safe_open

            weight_map = {}
            for file in files:
                with safe_open(str(file), "pt") as handle:
                    for name in handle.keys():
                        weight_map[name] = file.name
        self.weight_map: dict[str, str] = dict(weight_map)
        self._handles: dict[str, Any] = {}
        self.layers: dict[int, list[str]] = defaultdict(list)
        self.globals: list[str] = []
        for name in self.weight_map:
            match = _LAYER.match(name)
            if match and match["prefix"] == "model.layers":
                self.layers[int(match["index"])].append(name)
            else:
                self.globals.append(name)

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    def files(self) -> list[Path]:
        return sorted({self.model_dir / f for f in self.weight_map.values()})

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.model_dir / file), "pt")
        # A view of the memory-mapped file: tensors that outlive their layer (floats waiting in
        # an output shard) must be cloned by the caller, or they pin the whole input file.
        return self._handles[file].get_tensor(name)  # type: ignore[no-any-return]

    def release(self) -> None:
        self._handles.clear()


def layer_relative(name: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (3, 'mlp.up_proj.weight')."""
    match = _LAYER.match(name)
    if not match or match["prefix"] != "model.layers":
        return None
    return int(match["index"]), match["rest"]
