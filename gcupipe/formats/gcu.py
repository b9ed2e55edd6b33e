"""`gcu`: the layouts the vLLM-GCU loaders read (GPTQ, AWQ gemm, W8A8 with out/in scales, int8
KV-cache tensors on the attention modules), which upstream vLLM's GPTQ and AWQ loaders read too.
Its descriptor and structural rules: tensors of the shapes and dtypes the layout has, group sizes
that divide every input size, a KV-cache scale for every attention layer. What the GCU kernels
take beyond that (groups of 64, contiguous g_idx, symmetric 8-bit) is the gcu target's
(targets/gcu.py). Writing and reading: gcu_io.py.
"""

from __future__ import annotations

from pathlib import Path

from gcupipe.formats.base import QuantizedCheckpoint, TensorSelector
from gcupipe.formats.format import Combination, Description, Format, QuantizationFlag
from gcupipe.formats.gcu_io import (
    KV_LEAVES,
    METHODS,
    bits_and_group_size,
    gcu_settings,
    layout_method,
    read_gcu,
)
from gcupipe.formats.layout import want
from gcupipe.formats.modeldir import QUANTIZE_CONFIG, ModelDir
from gcupipe.formats.results import CheckOptions, Finding, Rule, Skip
from gcupipe.quant.scheme import ActivationScheme


def _module_types(md: ModelDir) -> dict[str, str]:
    types: dict[str, str] = {}
    for name, info in md.tensors.items():
        if name.endswith(".weight") and len(info.shape) == 2:
            types[name.removesuffix(".weight")] = "W8A8" if info.dtype in ("I8", "U8") else "FLOAT"
        elif name.endswith(".qweight"):
            types[name.removesuffix(".qweight")] = (md.quant_method or "packed").upper()
    return types


def _in_features(md: ModelDir, prefix: str, method: str, bits: int) -> int | None:
    info = md.tensors.get(f"{prefix}.qweight")
    if info is None or len(info.shape) != 2:
        return None
    return info.shape[0] * 32 // bits if method == "gptq" else info.shape[0]


def _shapes(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    method = md.quant_method
    tensors = md.tensors
    bits, group = bits_and_group_size(gcu_settings(md))
    findings: list[Finding] = []
    for prefix, kind in _module_types(md).items():
        why = f"{kind} ({prefix})"
        if method in ("gptq", "awq") and kind in ("GPTQ", "AWQ"):
            qweight = tensors[f"{prefix}.qweight"]
            if qweight.dtype != "I32" or len(qweight.shape) != 2:
                findings.append(
                    Finding(
                        f"{prefix}.qweight is {qweight.dtype} {list(qweight.shape)}, needs "
                        "int32 2-D",
                        "re-write it",
                    )
                )
                continue
            if method == "gptq":
                k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
                zeros_shape = (k // group if group else 1, n * bits // 32)
            else:
                k, n = qweight.shape[0], qweight.shape[1] * 8
                zeros_shape = (k // group if group else 1, n // 8)
            groups = k // group if group else 1
            name = f"{prefix}.qzeros"
            want(findings, tensors.get(name), name, {"I32"}, [zeros_shape], why)
            name = f"{prefix}.scales"
            want(findings, tensors.get(name), name, {"F16"}, [(groups, n)], why)
            if method == "gptq":
                name = f"{prefix}.g_idx"
                want(findings, tensors.get(name), name, {"I32"}, [(k,)], why)
        elif method == "w8a8" and kind == "W8A8":
            n, k = tensors[f"{prefix}.weight"].shape
            name = f"{prefix}.out_scales"
            want(findings, tensors.get(name), name, {"F32"}, [(n,), (n, 1)], why)
            name = f"{prefix}.in_scales"
            want(findings, tensors.get(name), name, {"F32", "F16", "BF16"}, [(k,), (1,), ()], why)
    return findings


def _group_size(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    method = str(md.quant_method)
    if method not in ("gptq", "awq"):
        raise Skip(f"{method} layout")
    bits, group = bits_and_group_size(gcu_settings(md))
    if not group:
        raise Skip("per-channel scales")
    for prefix, kind in sorted(_module_types(md).items()):
        k = _in_features(md, prefix, method, bits) if kind in ("GPTQ", "AWQ") else None
        if k is not None and k % group:
            return [
                Finding(
                    f"group_size {group} does not divide {prefix}'s input size {k}",
                    "pick a group size that divides every layer's input size (e.g. 64), "
                    "or ignore that layer",
                )
            ]
    return []


LEGACY_KV_FILE = "int8_kv_cache.json"
"""Where gcupipe once wrote the scales: read by no vLLM since 0.7 (kv_cache_scales_loader and
--quantization-param-path are gone; 0.9.2's QuantParamSchema takes float8_e4m3fn only)."""


def _kv_cache(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    names = [n for n in md.tensors if n.endswith(".self_attn.k_scale")]
    if (md.path / LEGACY_KV_FILE).is_file() and not names:
        return [
            Finding(
                f"the int8 KV-cache scales are only in {LEGACY_KV_FILE}, which vLLM 0.9.2 (what "
                "vLLM-GCU runs) never reads: it has no --quantization-param-path, and "
                "GCUBaseKVCacheMethod loads the scales from the checkpoint",
                "re-quantize with kv_cache: {dtype: int8} (gcupipe writes the tensors)",
            )
        ]
    if not (names or opts.kv_cache_int8):
        raise Skip("no int8 KV cache")
    leaves = [leaf for leaf in KV_LEAVES if md.quant_method == "w8a8" or "zero" not in leaf]
    missing = [
        f"model.layers.{i}.self_attn.{leaf}"
        for i in range(md.num_layers)
        for leaf in leaves
        if f"model.layers.{i}.self_attn.{leaf}" not in md.tensors
    ]
    if missing:
        return [
            Finding(
                f"{len(missing)} KV-cache tensor(s) are missing, e.g. {missing[0]}",
                "calibrate the KV cache over every attention layer (kv_cache: {dtype: int8})",
            )
        ]
    return []


RULES = (
    Rule(
        "tensor-dtypes-shapes",
        "each quantized layer's tensors have the dtypes and shapes its loader creates",
        _shapes,
    ),
    Rule("group-size", "the group size divides every layer's input size", _group_size),
    Rule(
        "kv-cache-scales",
        "int8 KV cache: per-tensor scales (w8a8: and zero points) on every attention layer",
        _kv_cache,
    ),
)


def _flag(method: str) -> QuantizationFlag:
    """On a GCU pass the method (vLLM-GCU names its loaders so); unset also loads it, since
    vLLM then reads config.json's quantization_config itself."""
    what = f"{method} in the vLLM-GCU layout (config.json quantization_config)"
    return QuantizationFlag(method, frozenset({method, f"{method}_gcu", None}), what)


class GcuFormat(Format):
    name = "gcu"
    summary = "what the vLLM-GCU loaders read (GPTQ, AWQ gemm, W8A8, int8 KV-cache tensors)"
    writer_class = "gcupipe.formats.gcu_io:GcuWriter"
    symmetric_activations = True  # in_scales only: the w8a8 loader has no zero point
    required_files = (
        (
            QUANTIZE_CONFIG,
            f"write {QUANTIZE_CONFIG} (quant_method, bits, group_size) as the "
            "vLLM-GCU loaders expect",
        ),
    )

    def detect(self, md: ModelDir) -> bool:
        return md.quant_method in METHODS

    def read(self, path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
        return read_gcu(path, select)

    def problems(self, combo: Combination) -> list[tuple[str, str]]:
        if combo.activation is ActivationScheme.DYNAMIC:
            return [
                (
                    "format",
                    "the gcu layouts have no dynamic W8A8 (their w8a8 takes static per-tensor "
                    "input scales); use method w8a8, or format modelslim / compressed-tensors "
                    f"for {combo.method}",
                )
            ]
        return []

    def quantization_flag(self, md: ModelDir) -> QuantizationFlag:
        return _flag(str(md.quant_method))

    def planned_quantization_flag(self, combo: Combination) -> QuantizationFlag:
        return _flag(layout_method(combo.method, combo.activation, combo.bits))

    def module_types(self, md: ModelDir) -> dict[str, str]:
        return _module_types(md)

    def describe(self, md: ModelDir) -> Description:
        method = str(md.quant_method)
        bits, group_size = bits_and_group_size(gcu_settings(md))
        layer_types = {}
        for name in md.tensors:
            prefix, _, leaf = name.rpartition(".")
            if leaf == "qweight":
                layer_types[prefix] = "W4A16" if bits == 4 else "W8A16"
            elif leaf == "out_scales":
                layer_types[prefix] = "W8A8"
        return Description(
            method="w8a16" if method == "gptq" and bits == 8 else method,
            group_size=group_size,
            layer_types=layer_types,
            kv_cache="int8" if any(n.endswith(".self_attn.k_scale") for n in md.tensors) else None,
        )

    def rules(self) -> tuple[Rule, ...]:
        return RULES


FORMAT = GcuFormat()
