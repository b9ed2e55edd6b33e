"""`compressed-tensors`: the layout upstream vLLM loads on CUDA and CPU (and vLLM-GCU accepts),
detected from config.json, so no `--quantization` is needed. Its descriptor and its one rule;
writing and reading, through the compressed-tensors library: compressed_tensors_io.py."""

from __future__ import annotations

from pathlib import Path

from gcupipe.formats.base import QuantizedCheckpoint, TensorSelector
from gcupipe.formats.compressed_tensors_io import QUANTIZATION, read_compressed_tensors
from gcupipe.formats.format import Combination, Description, Format, QuantizationFlag
from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.results import CheckOptions, Finding, Rule


def _module_types(md: ModelDir) -> dict[str, str]:
    types: dict[str, str] = {}
    for name, info in md.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            types[name.removesuffix(".weight")] = "INT8" if info.dtype in ("I8", "U8") else "FLOAT"
        elif name.endswith(".weight_packed"):
            types[name.removesuffix(".weight_packed")] = "PACKED"
    return types


def _scales(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    needs = {"INT8": ("weight_scale",), "PACKED": ("weight_scale", "weight_shape")}
    missing = [
        f"{prefix}.{leaf}"
        for prefix, kind in sorted(_module_types(md).items())
        for leaf in needs.get(kind, ())
        if f"{prefix}.{leaf}" not in md.tensors
    ]
    if not missing:
        return []
    return [
        Finding(
            f"{len(missing)} compressed-tensors parameter(s) are missing, e.g. {missing[0]} "
            "(vLLM cannot decompress the weight without it)",
            "re-write the model through the compressed-tensors writer",
        )
    ]


RULES = (
    Rule(
        "compressed-tensors-scales",
        "every quantized weight carries its scale (and its shape when packed)",
        _scales,
    ),
)


FLAG = QuantizationFlag(
    None,
    frozenset({None, QUANTIZATION}),
    "compressed-tensors (config.json quantization_config; vLLM detects it)",
)


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    summary = "upstream vLLM's layout, written through the compressed-tensors library"
    writer_class = "gcupipe.formats.compressed_tensors_io:CompressedTensorsWriter"
    native_target = "cuda"

    def detect(self, md: ModelDir) -> bool:
        return md.quant_method == QUANTIZATION

    def read(self, path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
        return read_compressed_tensors(path, select)

    def problems(self, combo: Combination) -> list[tuple[str, str]]:
        if combo.kv_cache:
            return [
                (
                    "kv_cache",
                    "vLLM reads only fp8 KV-cache scales from compressed-tensors; use format "
                    "gcu or modelslim for an int8 KV cache",
                )
            ]
        return []

    def quantization_flag(self, md: ModelDir) -> QuantizationFlag:
        return FLAG

    def planned_quantization_flag(self, combo: Combination) -> QuantizationFlag:
        return FLAG

    def module_types(self, md: ModelDir) -> dict[str, str]:
        return _module_types(md)

    def describe(self, md: ModelDir) -> Description:
        groups = list(((md.quantization_config or {}).get("config_groups") or {}).values())
        kinds = []
        group_size = 0
        for group in groups:
            weights = group.get("weights") or {}
            activations = group.get("input_activations")
            bits = int(weights.get("num_bits", 8))
            if activations is None:
                kinds.append(f"W{bits}A16")
            else:
                kinds.append("W8A8_DYNAMIC" if activations.get("dynamic") else "W8A8")
            group_size = int(weights.get("group_size") or 0)
        kind = kinds[0] if len(set(kinds)) == 1 else "MIXED"
        layer_types = {
            name.removesuffix(".weight_scale"): kind
            for name in md.tensors
            if name.endswith(".weight_scale")
        }
        return Description(method=kind.lower(), group_size=group_size, layer_types=layer_types)

    def rules(self) -> tuple[Rule, ...]:
        return RULES


FORMAT = CompressedTensorsFormat()
