"""`gcupipe inspect DIR`: what a model directory holds, from headers only (no tensor data read).

Recognises every registered format (and plain float checkpoints) through its descriptor; reports
the method, per-layer types, group size, sizes and the `--quantization` value a vLLM server
needs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError
from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.registry import format_of


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


def inspect_model_dir(path: Path | str) -> ModelInspection:
    """What `path` holds, from its JSON files and safetensors headers (no tensor data)."""
    md = ModelDir(Path(path))
    if md.config is None:
        raise StageError(f"{md.path} is not a model directory (no config.json)")
    broken = [(f, problem) for f, problem in _header_problems(md) if problem]
    if broken and not md.tensors:
        raise StageError(f"cannot inspect {md.path}: {broken[0][1]}")
    result = ModelInspection(
        path=str(md.path),
        format="float",
        method="float",
        quantization=None,
        group_size=0,
        weight_files=len(md.safetensors_files),
        weight_bytes=sum(f.stat().st_size for f in md.safetensors_files),
        tensors=len(md.tensors),
    )
    fmt = format_of(md)
    if fmt is not None:
        described = fmt.describe(md)
        result.format = fmt.name
        result.method = described.method
        result.quantization = fmt.quantization_flag(md).value
        result.group_size = described.group_size
        result.layer_types = described.layer_types
        result.kv_cache = described.kv_cache
    result.type_counts = dict(Counter(result.layer_types.values()))
    return result


def _header_problems(md: ModelDir) -> list[tuple[str, str]]:
    _ = md.tensors
    return [(p.file, p.message) for p in md.header_problems]


def render_inspection(info: ModelInspection, per_layer: bool = False) -> str:
    """The text `gcupipe inspect` prints (per-layer types only when asked)."""
    lines = info.summary_lines()
    if per_layer:
        lines += [f"  {prefix}: {kind}" for prefix, kind in sorted(info.layer_types.items())]
    return "\n".join(lines)
