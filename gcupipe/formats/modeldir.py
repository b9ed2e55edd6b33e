"""A read-only view of a model directory: its files, JSON, safetensors headers, tensors.

Only safetensors *headers* are parsed here (8-byte length + JSON), never the tensor data, so
looking at a 30 GB model costs a few reads; a header whose data would run past the end of the
file is how a truncated shard is caught. Tensors are loaded only when asked for (`tensor`).
Which layout the directory holds is the format registry's answer (`formats.registry.format_of`).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

QUANTIZE_CONFIG = "quantize_config.json"
"""The GPTQ-family settings file (AutoGPTQ convention), read when config.json has none."""
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: I8, I32, F32, F16, BF16...
    shape: tuple[int, ...]
    file: str


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], str | None]:
    """Tensor infos of one safetensors file, or a problem saying why the file is damaged."""
    size = path.stat().st_size
    if size < 8:
        return {}, f"{path.name} is {size} bytes: not even a header length"
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8 or header_len > 100 << 20:
            return {}, (
                f"{path.name} is truncated or not safetensors: its header claims "
                f"{header_len} bytes but the file has {size}"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path.name} has a corrupt header ({exc.__class__.__name__})"
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        infos[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path.name)
        data_end = max(data_end, int(entry["data_offsets"][1]))
    expected = 8 + header_len + data_end
    if size < expected:
        return infos, (
            f"{path.name} is truncated: its header needs {expected} bytes, the file "
            f"has {size} ({expected - size} missing)"
        )
    return infos, None


@dataclass
class HeaderProblem:
    file: str
    message: str


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class ModelDir:
    """Everything rules, inspection and format detection look at, read lazily and once."""

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
