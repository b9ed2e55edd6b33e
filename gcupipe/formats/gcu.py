"""`gcu`: the layouts the vLLM-GCU loaders read (GPTQ, AWQ gemm, W8A8 with out/in scales, an
int8 KV-cache json), served with `--quantization gptq|awq|w8a8` on a GCU. Its descriptor and the
rules of those loaders: GPTQ's g_idx must be contiguous (no act-order shuffle), the 4-bit kernels
take groups of 64 or a multiple, the AWQ path groups of 64, the 8-bit GPTQ path symmetric zeros,
and an int8 KV cache needs a scale for every attention layer. Writing and reading: gcu_io.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gcupipe.formats.base import QuantizedCheckpoint, TensorSelector
from gcupipe.formats.format import (
    Combination,
    Description,
    Format,
    QuantizationFlag,
    unsupported_platform,
)
from gcupipe.formats.gcu_io import KV_FILE, METHODS, bits_and_group_size, gcu_settings, read_gcu
from gcupipe.formats.layout import want
from gcupipe.formats.modeldir import QUANTIZE_CONFIG, ModelDir
from gcupipe.formats.results import CheckOptions, Finding, Rule, Skip
from gcupipe.platform import Platform
from gcupipe.quant.scheme import ActivationScheme

GROUP_QUANTUM = 64
"""The GCU 4-bit kernels take groups of 64 or a multiple; the AWQ path exactly 64."""


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
    settings = gcu_settings(md)
    bits = int(settings.get("bits", settings.get("w_bit", 4)))
    group = int(settings.get("group_size", settings.get("q_group_size", -1)))
    findings: list[Finding] = []
    if method == "awq" and group != GROUP_QUANTUM:
        findings.append(
            Finding(
                f"AWQ group_size is {group}; the vLLM-GCU AWQ kernels take exactly {GROUP_QUANTUM}",
                "re-quantize with group_size: 64",
            )
        )
    if method == "gptq":
        if group <= 0 and bits != 8:
            findings.append(
                Finding(
                    f"{bits}-bit GPTQ with group_size {group} (per channel): the GCU 4-bit "
                    "kernels need groups",
                    "re-quantize with group_size: 64 (or a multiple)",
                )
            )
        elif group > 0 and group % GROUP_QUANTUM:
            findings.append(
                Finding(
                    f"GPTQ group_size {group} is not 64 or a multiple of 64, which the GCU "
                    "kernels require",
                    "re-quantize with group_size: 64, 128, ...",
                )
            )
    if group > 0:
        for prefix, kind in sorted(_module_types(md).items()):
            k = _in_features(md, prefix, method, bits) if kind in ("GPTQ", "AWQ") else None
            if k is not None and k % group:
                findings.append(
                    Finding(
                        f"group_size {group} does not divide {prefix}'s input size {k}",
                        "pick a group size that divides every layer's input size (e.g. 64), "
                        "or ignore that layer",
                    )
                )
                break
    return findings


def _g_idx_contiguous(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.quant_method != "gptq":
        raise Skip("not a GPTQ layout")
    import torch

    settings = gcu_settings(md)
    group = int(settings.get("group_size", -1))
    findings = []
    if settings.get("desc_act"):
        findings.append(
            Finding(
                "desc_act is true: the GCU GPTQ loader needs static groups",
                "re-quantize with desc_act: false",
            )
        )
    for name in sorted(n for n in md.tensors if n.endswith(".g_idx")):
        g_idx = md.tensor(name).to(torch.int64)
        size = g_idx.numel()
        expected = torch.arange(size) // (group if group > 0 else size)
        if not torch.equal(g_idx, expected):
            first = int((g_idx != expected).nonzero()[0])
            findings.append(
                Finding(
                    f"{name} is not contiguous: g_idx[{first}] = {int(g_idx[first])}, expected "
                    f"{int(expected[first])}",
                    "re-quantize without act-order (desc_act: false) or re-order the weight "
                    "into static groups",
                )
            )
            break
    return findings


def _gptq_int8_symmetric(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.quant_method != "gptq" or int(gcu_settings(md).get("bits", 4)) != 8:
        raise Skip("not an 8-bit GPTQ layout")
    import torch

    for name in sorted(n for n in md.tensors if n.endswith(".qzeros")):
        stored = md.tensor(name).view(torch.int8)
        if not bool((stored == 127).all()):  # v1 convention: zero - 1 = 127
            return [
                Finding(
                    f"{name} holds asymmetric zero points; the vLLM-GCU 8-bit GPTQ loader "
                    "asserts every stored zero is 127",
                    "re-quantize with symmetric: true",
                )
            ]
    return []


def _kv_cache(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if not ((md.path / KV_FILE).is_file() or opts.kv_cache_int8):
        raise Skip("no int8 KV cache")
    data: Any = md.json_file(KV_FILE)
    if data is None:
        return [
            Finding(
                f"{KV_FILE} is missing or not JSON",
                "write the int8 KV-cache scales (served with --kv-cache-dtype int8 "
                "--quantization-param-path)",
            )
        ]
    kv = data.get("kv_cache") if isinstance(data, dict) else None
    if not isinstance(kv, dict) or kv.get("dtype") != "int8":
        return [
            Finding(
                f'{KV_FILE} has no kv_cache.dtype "int8"',
                "write kv_cache: {dtype: int8, scaling_factor: ...}",
            )
        ]
    factors = kv.get("scaling_factor")
    if not isinstance(factors, dict) or not factors:
        return [Finding(f"{KV_FILE} has no kv_cache.scaling_factor", "write per-rank scales")]
    findings = []
    for rank, layers in sorted(factors.items()):
        have = {int(k) for k in layers} if isinstance(layers, dict) else set()
        absent = sorted(set(range(md.num_layers)) - have)
        if absent:
            findings.append(
                Finding(
                    f"{KV_FILE} rank {rank} has no scale for layer(s) {absent[:5]}",
                    "calibrate every attention layer",
                )
            )
    return findings


RULES = (
    Rule(
        "tensor-dtypes-shapes",
        "each quantized layer's tensors have the dtypes and shapes its loader creates",
        _shapes,
    ),
    Rule(
        "group-size",
        "group size fits the GCU kernels (GPTQ: 64 or a multiple; AWQ: exactly 64) and "
        "divides every layer's input size",
        _group_size,
    ),
    Rule(
        "g-idx-contiguous",
        "GPTQ g_idx is i // group_size (no act-order shuffle)",
        _g_idx_contiguous,
    ),
    Rule(
        "gptq-int8-symmetric",
        "8-bit GPTQ zero points are all 128 (the GCU 8-bit path is symmetric only)",
        _gptq_int8_symmetric,
    ),
    Rule(
        "kv-cache-scales",
        "int8 KV cache: scales (and zero points) for every attention layer",
        _kv_cache,
    ),
)


class GcuFormat(Format):
    name = "gcu"
    summary = "what the vLLM-GCU loaders read (GPTQ, AWQ gemm, W8A8, int8 KV-cache json)"
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
        problems = []
        if combo.activation is ActivationScheme.DYNAMIC:
            problems.append(
                (
                    "format",
                    "the vLLM-GCU `w8a8` loader takes static per-tensor input scales only; use "
                    "method w8a8, or format modelslim / compressed-tensors for "
                    f"{combo.method}",
                )
            )
        weight_only = combo.activation is ActivationScheme.NONE
        if weight_only and combo.bits == 8 and not combo.symmetric:
            problems.append(
                (
                    "symmetric",
                    "the vLLM-GCU 8-bit GPTQ loader accepts symmetric weights only (every zero "
                    "point 128); set symmetric: true",
                )
            )
        if combo.bits == 4 and combo.group_size % GROUP_QUANTUM:
            problems.append(
                (
                    "group_size",
                    "vLLM-GCU 4-bit kernels need a group size that is a multiple of 64, got "
                    f"{combo.group_size}",
                )
            )
        if combo.bits == 4 and combo.group_size == 0:
            problems.append(
                (
                    "group_size",
                    "vLLM-GCU 4-bit GPTQ/AWQ needs grouped scales (group_size 64 or a multiple)",
                )
            )
        if combo.method == "awq" and combo.group_size not in (0, GROUP_QUANTUM):
            problems.append(("group_size", "the vLLM-GCU AWQ path is validated with group size 64"))
        return problems

    def quantization_flag(self, md: ModelDir) -> QuantizationFlag:
        """On a GCU pass the method (vLLM-GCU names its loaders so); unset also loads it,
        since vLLM then reads config.json's quantization_config itself."""
        method = str(md.quant_method)
        what = f"{method} in the vLLM-GCU layout (config.json quantization_config)"
        return QuantizationFlag(method, frozenset({method, f"{method}_gcu", None}), what)

    def serve_quantization(self, md: ModelDir, platform: Platform) -> str | None:
        if platform is Platform.GCU:
            return md.quant_method
        if md.quant_method == "w8a8":
            raise unsupported_platform(
                md,
                "gcu format's w8a8",
                platform,
                "serve the modelslim or compressed-tensors export here",
            )
        return None  # GPTQ / AWQ: vLLM reads quantization_config itself

    def int8_kv_cache_file(self, md: ModelDir) -> Path | None:
        path = md.path / KV_FILE
        return path if path.is_file() else None

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
            kv_cache="int8" if (md.path / KV_FILE).is_file() else None,
        )

    def rules(self) -> tuple[Rule, ...]:
        return RULES


FORMAT = GcuFormat()
