"""A read-only view of a model directory for the structural rules: files, format, headers.

Only safetensors *headers* are parsed here (8-byte length + JSON), never the tensor data, so
checking a 30 GB model costs a few reads; a header whose data would run past the end of the file
is how a truncated shard is caught. Tensors are loaded only by rules that need values (g_idx).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from gcupipe.formats.base import TensorInfo, read_safetensors_header

DESCRIPTION = "quant_model_description.json"
KV_JSON = "int8_kv_cache.json"
QUANTIZE_CONFIG = "quantize_config.json"
QUANT_TYPES = {"FLOAT", "W8A8", "W8A8_DYNAMIC", "W8A16", "W4A16", "C8"}
DESCRIPTION_META = {"model_quant_type", "version", "group_size", "kv_cache_type", "kv_quant_type",
                    "fa_quant_type", "reduce_quant_type", "metadata"}
GCU_METHODS = {"gptq", "awq", "w8a8"}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class HeaderProblem:
    file: str
    message: str


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class ModelDir:
    """Everything the rules look at, read lazily and once."""

    path: Path
    header_problems: list[HeaderProblem] = field(default_factory=list)

    def json_file(self, name: str) -> dict[str, Any] | None:
        file = self.path / name
        if not file.is_file():
            return None
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @cached_property
    def config(self) -> dict[str, Any] | None:
        return self.json_file("config.json")

    @cached_property
    def description(self) -> dict[str, Any] | None:
        return self.json_file(DESCRIPTION)

    @cached_property
    def quantization_config(self) -> dict[str, Any] | None:
        config = self.config or {}
        qc = config.get("quantization_config")
        if qc is None and isinstance(config.get("text_config"), dict):
            qc = config["text_config"].get("quantization_config")
        return qc if isinstance(qc, dict) else None

    @cached_property
    def quant_method(self) -> str | None:
        qc = self.quantization_config or self.json_file(QUANTIZE_CONFIG) or {}
        method = qc.get("quant_method")
        return str(method).lower() if method else None

    @cached_property
    def format(self) -> str:
        """modelslim | gcu | compressed-tensors | float."""
        if (self.path / DESCRIPTION).is_file():
            return "modelslim"
        if self.quant_method in GCU_METHODS:
            return "gcu"
        if self.quant_method == "compressed-tensors":
            return "compressed-tensors"
        return "float"

    @cached_property
    def safetensors_files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    @cached_property
    def indexes(self) -> dict[str, dict[str, str]]:
        """index file name -> its weight_map."""
        maps: dict[str, dict[str, str]] = {}
        for file in sorted(self.path.glob("*.safetensors.index.json")):
            data = self.json_file(file.name) or {}
            weight_map = data.get("weight_map")
            maps[file.name] = weight_map if isinstance(weight_map, dict) else {}
        return maps

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for file in self.safetensors_files:
            found, problem = read_safetensors_header(file)
            if problem:
                self.header_problems.append(HeaderProblem(file.name, problem))
            infos.update(found)
        return infos

    def tensor(self, name: str) -> Any:
        """The values of one tensor (loaded on demand; rules needing values are few)."""
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(self.path / info.file), "pt") as handle:
            return handle.get_tensor(name)

    @cached_property
    def num_layers(self) -> int:
        config = self.config or {}
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        value = config.get("num_hidden_layers", (text or {}).get("num_hidden_layers"))
        if isinstance(value, int):
            return value
        indices = [i for i in (layer_index(n) for n in self.tensors) if i is not None]
        return max(indices) + 1 if indices else 0

    @cached_property
    def module_types(self) -> dict[str, str]:
        """Linear module prefix -> quant type (modelslim names; GPTQ/AWQ/W8A8/INT8 for the
        other layouts; FLOAT for a float weight)."""
        types: dict[str, str] = {}
        description = self.description or {}
        for name, info in self.tensors.items():
            if name.endswith(".weight") and len(info.shape) == 2:
                prefix = name[: -len(".weight")]
                if self.format == "modelslim":
                    types[prefix] = str(description.get(name, "UNLISTED"))
                elif info.dtype in ("I8", "U8"):
                    types[prefix] = "W8A8" if self.format == "gcu" else "INT8"
                else:
                    types[prefix] = "FLOAT"
            elif name.endswith(".qweight"):
                types[name[: -len(".qweight")]] = (self.quant_method or "packed").upper()
            elif name.endswith(".weight_packed"):
                types[name[: -len(".weight_packed")]] = "PACKED"
        return types

    @cached_property
    def quantized(self) -> bool:
        return self.format != "float"
