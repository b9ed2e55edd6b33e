"""`gcupipe inspect DIR`: what a model directory holds, from headers only (no tensor data read).

Recognises modelslim, gcu (GPTQ / AWQ / w8a8) and compressed-tensors outputs, and plain float
checkpoints; reports the method, per-layer types, group size, sizes and the `--quantization`
value a vLLM server needs.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError
from gcupipe.formats.base import read_safetensors_header


@dataclass
class ModelInspection:
    path: str
    format: str  # modelslim | gcu | compressed-tensors | float
    method: str  # e.g. w8a8_dynamic, gptq, w8a16
    quantization: str | None  # vLLM --quantization value (None: plain float model)
    group_size: int  # 0 = per channel
    layer_types: dict[str, str] = field(default_factory=dict)  # module prefix -> type
    type_counts: dict[str, int] = field(default_factory=dict)
    kv_cache: str | None = None  # "int8" when KV-cache scales are present
    weight_files: int = 0
    weight_bytes: int = 0
    tensors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the CLI (per-layer types folded into counts)."""
        lines = [
            f"path:          {self.path}",
            f"format:        {self.format}",
            f"method:        {self.method}",
            f"group size:    {self.group_size or 'per-channel'}",
            f"kv cache:      {self.kv_cache or 'model dtype'}",
            f"weights:       {self.weight_bytes / 2**20:.1f} MiB in {self.weight_files} file(s),"
            f" {self.tensors} tensors",
            "layer types:   "
            + (", ".join(f"{k} x{v}" for k, v in sorted(self.type_counts.items())) or "all float"),
            f"vLLM:          --quantization {self.quantization}"
            if self.quantization
            else "vLLM:          (no --quantization needed)",
        ]
        return lines


def _headers(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) of every safetensors file, from the file headers."""
    out: dict[str, tuple[str, list[int]]] = {}
    for file in sorted(path.glob("*.safetensors")):
        infos, problem = read_safetensors_header(file)
        if problem is not None and not infos:
            raise StageError(f"cannot inspect {path}: {problem}")
        out.update({name: (info.dtype, list(info.shape)) for name, info in infos.items()})
    return out


def inspect_model_dir(path: Path | str) -> ModelInspection:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise StageError(f"{path} is not a model directory (no config.json)")
    files = sorted(path.glob("*.safetensors"))
    headers = _headers(path)
    result = ModelInspection(
        path=str(path),
        format="float",
        method="float",
        quantization=None,
        group_size=0,
        weight_files=len(files),
        weight_bytes=sum(f.stat().st_size for f in files),
        tensors=len(headers),
    )
    config = json.loads((path / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    description_path = path / "quant_model_description.json"
    if description_path.is_file():
        _modelslim(result, json.loads(description_path.read_text()))
    elif qc.get("quant_method") == "compressed-tensors":
        _compressed_tensors(result, qc, headers)
    elif (
        qc.get("quant_method") in ("gptq", "awq", "w8a8")
        or (path / "quantize_config.json").is_file()
    ):
        if not qc:
            qc = json.loads((path / "quantize_config.json").read_text())
        _gcu(result, qc, headers, (path / "int8_kv_cache.json").is_file())
    result.type_counts = dict(Counter(result.layer_types.values()))
    return result


def _modelslim(result: ModelInspection, description: dict[str, Any]) -> None:
    result.format = "modelslim"
    result.quantization = "gcu"
    result.method = str(description.get("model_quant_type", "")).lower()
    result.group_size = int(description.get("group_size", 0))
    result.kv_cache = "int8" if description.get("kv_cache_type") == "C8" else None
    for name, kind in description.items():
        if name.endswith(".weight") and isinstance(kind, str) and kind != "FLOAT":
            result.layer_types[name[: -len(".weight")]] = kind


def _gcu(
    result: ModelInspection, qc: dict[str, Any], headers: dict[str, tuple[str, list[int]]], kv: bool
) -> None:
    method = qc.get("quant_method", "")
    bits = int(qc.get("bits", qc.get("w_bit", 8)))
    result.format = "gcu"
    result.quantization = method
    result.method = "w8a16" if method == "gptq" and bits == 8 else method
    result.group_size = max(int(qc.get("group_size", qc.get("q_group_size", 0)) or 0), 0)
    result.kv_cache = "int8" if kv else None
    for name in headers:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            result.layer_types[prefix] = "W4A16" if bits == 4 else "W8A16"
        elif leaf == "out_scales":
            result.layer_types[prefix] = "W8A8"


def _compressed_tensors(
    result: ModelInspection, qc: dict[str, Any], headers: dict[str, tuple[str, list[int]]]
) -> None:
    result.format = "compressed-tensors"
    result.quantization = "compressed-tensors"
    groups = list((qc.get("config_groups") or {}).values())
    kinds = []
    for group in groups:
        weights = group.get("weights") or {}
        acts = group.get("input_activations")
        bits = int(weights.get("num_bits", 8))
        if acts is None:
            kinds.append(f"W{bits}A16")
        else:
            kinds.append("W8A8_DYNAMIC" if acts.get("dynamic") else "W8A8")
        result.group_size = int(weights.get("group_size") or 0)
    kind = kinds[0] if len(set(kinds)) == 1 else "MIXED"
    result.method = kind.lower()
    for name in headers:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight_scale":
            result.layer_types[prefix] = kind


def render_inspection(info: ModelInspection, per_layer: bool = False) -> str:
    """The text `gcupipe inspect` prints (per-layer types only when asked)."""
    lines = info.summary_lines()
    if per_layer:
        lines += [f"  {prefix}: {kind}" for prefix, kind in sorted(info.layer_types.items())]
    return "\n".join(lines)
