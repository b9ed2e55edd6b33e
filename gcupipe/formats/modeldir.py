"""A read-only view of a model directory: its files, JSON, safetensors headers, tensors.

Only safetensors *headers* are parsed here (8-byte length + JSON), never the tensor data, so
looking at a 30 GB model costs a few reads; a header whose data would run past the end of the
file is how a truncated shard is caught. Tensors are loaded only when asked for (`tensor`).
Which layout the directory holds is the format registry's answer (`formats.registry.format_of`).
"""

from __future__ import annotations

import json
import math
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


SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
"""Bytes per element of each dtype code the safetensors format defines."""
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], str | None]:
    """Tensor infos of one safetensors file, or a problem saying why the file is damaged. Only
    the header is read, and nothing is allocated at the sizes it claims: every entry is checked
    (a known dtype, a shape of non-negative integers, data offsets inside the file that hold
    exactly shape x dtype bytes) before it is believed."""
    try:
        size = path.stat().st_size
        if size < 8:
            return {}, f"{path.name} is {size} bytes: not even a header length"
        with path.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8 or header_len > MAX_HEADER_BYTES:
                return {}, (
                    f"{path.name} is truncated or not safetensors: its header claims "
                    f"{header_len} bytes but the file has {size}"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        return {}, f"{path.name} cannot be read ({exc.strerror or exc})"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path.name} has a corrupt header ({exc.__class__.__name__})"
    if not isinstance(header, dict):
        return {}, f"{path.name} has a corrupt header (not a JSON object)"
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem is not None:
            return infos, f"{path.name}: tensor {name[:200]!r} {problem}"
        infos[name] = TensorInfo(name, entry["dtype"], tuple(entry["shape"]), path.name)
        data_end = max(data_end, entry["data_offsets"][1])
    expected = 8 + header_len + data_end
    if size < expected:
        return infos, (
            f"{path.name} is truncated: its header needs {expected} bytes, the file "
            f"has {size} ({expected - size} missing)"
        )
    return infos, None


def _entry_problem(entry: Any) -> str | None:
    """Why one header entry cannot describe a tensor, or None."""
    if not isinstance(entry, dict):
        return "has no dtype, shape and data_offsets"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        return f"has an unknown dtype {str(dtype)[:40]!r}"
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return f"has a bad shape {str(shape)[:80]}"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"has bad data_offsets {str(offsets)[:80]}"
    needed = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != needed:
        return (
            f"claims shape {shape} of {dtype} ({needed} bytes) but its data holds "
            f"{offsets[1] - offsets[0]} bytes"
        )
    return None


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
