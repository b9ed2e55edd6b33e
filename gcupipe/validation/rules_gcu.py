"""Rules of the GCU target's loaders: group sizes, static g_idx, 8-bit GPTQ zeros, KV-cache scales.

The vLLM-GCU GPTQ loader reshapes g_idx into whole groups (so act-order shuffles are rejected),
its 4-bit kernels take groups of 64 or a multiple, its AWQ path is built for groups of 64, and
its 8-bit GPTQ path asserts every zero point is 127 (symmetric). An int8 KV cache needs a scale
for every attention layer or the server falls back to scale 1.0 and produces garbage.
"""

from __future__ import annotations

from typing import Any

from gcupipe.validation.layout import _gcu_settings
from gcupipe.validation.modeldir import DESCRIPTION, KV_JSON, ModelDir
from gcupipe.validation.registry import CheckOptions, Skip, rule
from gcupipe.validation.results import Finding

GCU_GROUP_QUANTUM = 64


def _in_features(md: ModelDir, prefix: str, method: str, bits: int) -> int | None:
    info = md.tensors.get(f"{prefix}.qweight")
    if info is None or len(info.shape) != 2:
        return None
    return info.shape[0] * 32 // bits if method == "gptq" else info.shape[0]


@rule("group-size", "group size fits the GCU kernels (GPTQ: 64 or a multiple; AWQ: exactly "
      "64) and divides every layer's input size")
def group_size(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format == "modelslim":
        return _modelslim_group_size(md)
    if md.format != "gcu" or md.quant_method not in ("gptq", "awq"):
        raise Skip(f"{md.format} layout" + (f" ({md.quant_method})" if md.quant_method else ""))
    settings = _gcu_settings(md)
    method = str(md.quant_method)
    bits = int(settings.get("bits", settings.get("w_bit", 4)))
    group = int(settings.get("group_size", settings.get("q_group_size", -1)))
    findings: list[Finding] = []
    if method == "awq" and group != GCU_GROUP_QUANTUM:
        findings.append(Finding(f"AWQ group_size is {group}; the vLLM-GCU AWQ kernels take "
                                f"exactly {GCU_GROUP_QUANTUM}", "re-quantize with group_size: 64"))
    if method == "gptq":
        if group <= 0 and bits != 8:
            findings.append(Finding(f"{bits}-bit GPTQ with group_size {group} (per channel): the "
                                    "GCU 4-bit kernels need groups",
                                    "re-quantize with group_size: 64 (or a multiple)"))
        elif group > 0 and group % GCU_GROUP_QUANTUM:
            findings.append(Finding(f"GPTQ group_size {group} is not 64 or a multiple of 64, "
                                    "which the GCU kernels require",
                                    "re-quantize with group_size: 64, 128, ..."))
    if group > 0:
        for prefix, kind in sorted(md.module_types.items()):
            k = _in_features(md, prefix, method, bits) if kind in ("GPTQ", "AWQ") else None
            if k is not None and k % group:
                findings.append(Finding(f"group_size {group} does not divide {prefix}'s input "
                                        f"size {k}", "pick a group size that divides every "
                                        "layer's input size (e.g. 64), or ignore that layer"))
                break
    return findings


def _modelslim_group_size(md: ModelDir) -> list[Finding]:
    description = md.description or {}
    declared = int(description.get("group_size", 0) or 0)
    grouped = {}
    for prefix, kind in md.module_types.items():
        scale = md.tensors.get(f"{prefix}.weight_scale")
        weight = md.tensors.get(f"{prefix}.weight")
        if kind not in ("W8A16", "W4A16") or scale is None or weight is None:
            continue
        if len(scale.shape) == 2 and scale.shape[1] > 1:
            k = weight.shape[1] * (2 if kind == "W4A16" else 1)
            grouped[prefix] = (k, scale.shape[1])
    if not grouped:
        if declared:
            return [Finding(f"{DESCRIPTION} says group_size {declared} but every layer has "
                            "per-channel scales", "write group_size 0 for per-channel scales")]
        raise Skip("per-channel scales")
    findings = []
    for prefix, (k, groups) in sorted(grouped.items()):
        if k % groups or (declared and k // groups != declared):
            findings.append(Finding(f"{prefix} has {groups} scale groups over k = {k}, which "
                                    f"is not group_size {declared}", "re-run the quantize stage "
                                    "(scales and the description disagree)"))
            break
    return findings


@rule("g-idx-contiguous", "GPTQ g_idx is i // group_size (no act-order shuffle)")
def g_idx_contiguous(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format != "gcu" or md.quant_method != "gptq":
        raise Skip("not a GPTQ layout")
    import torch

    settings = _gcu_settings(md)
    group = int(settings.get("group_size", -1))
    findings = []
    if settings.get("desc_act"):
        findings.append(Finding("desc_act is true: the GCU GPTQ loader needs static groups",
                                "re-quantize with desc_act: false"))
    names = sorted(n for n in md.tensors if n.endswith(".g_idx"))
    for name in names:
        g_idx = md.tensor(name).to(torch.int64)
        size = g_idx.numel()
        expected = torch.arange(size) // (group if group > 0 else size)
        if not torch.equal(g_idx, expected):
            first = int((g_idx != expected).nonzero()[0])
            findings.append(Finding(f"{name} is not contiguous: g_idx[{first}] = "
                                    f"{int(g_idx[first])}, expected {int(expected[first])}",
                                    "re-quantize without act-order (desc_act: false) or "
                                    "re-order the weight into static groups"))
            break
    return findings


@rule("gptq-int8-symmetric", "8-bit GPTQ zero points are all 128 (the GCU 8-bit path is "
      "symmetric only)")
def gptq_int8_symmetric(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    settings = _gcu_settings(md)
    if md.format != "gcu" or md.quant_method != "gptq" or int(settings.get("bits", 4)) != 8:
        raise Skip("not an 8-bit GPTQ layout")
    import torch

    for name in sorted(n for n in md.tensors if n.endswith(".qzeros")):
        stored = md.tensor(name).view(torch.int8)
        if not bool((stored == 127).all()):  # v1 convention: zero - 1 = 127
            return [Finding(f"{name} holds asymmetric zero points; the vLLM-GCU 8-bit GPTQ "
                            "loader asserts every stored zero is 127", "re-quantize with "
                            "symmetric: true")]
    return []


@rule("kv-cache-scales", "int8 KV cache: scales (and offsets) for every attention layer")
def kv_cache_scales(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if md.format == "modelslim":
        return _modelslim_kv(md, opts)
    if md.format == "gcu" and ((md.path / KV_JSON).is_file() or opts.kv_cache_int8):
        return _gcu_kv(md)
    if opts.kv_cache_int8:
        return [Finding(f"an int8 KV cache was asked for, but the {md.format} layout carries "
                        "no int8 KV-cache scales", "use format modelslim or gcu for int8 KV")]
    raise Skip("no int8 KV cache")


def _modelslim_kv(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    description = md.description or {}
    c8 = [n for n, t in description.items() if t == "C8"]
    declared = description.get("kv_cache_type") == "C8"
    if not (declared or c8 or opts.kv_cache_int8):
        raise Skip("no int8 KV cache")
    findings = []
    if c8 and not declared:
        findings.append(Finding(f"C8 tensors are saved but {DESCRIPTION} has no "
                                "kv_cache_type: C8", "add \"kv_cache_type\": \"C8\""))
    missing = []
    for i in range(md.num_layers):
        attn = f"model.layers.{i}.self_attn"
        for kv in ("k", "v"):
            for what in ("scale", "offset"):
                name = f"{attn}.{kv}_proj.kv_cache_{what}"
                if name not in md.tensors:
                    missing.append(name)
    if missing:
        findings.append(Finding(f"{len(missing)} KV-cache tensor(s) are missing, e.g. "
                                f"{missing[0]}", "calibrate the KV cache over every attention "
                                "layer (kv_cache: {dtype: int8})"))
    return findings


def _gcu_kv(md: ModelDir) -> list[Finding]:
    data: Any = md.json_file(KV_JSON)
    if data is None:
        return [Finding(f"{KV_JSON} is missing or not JSON", "write the int8 KV-cache scales "
                        "(served with --kv-cache-dtype int8 --quantization-param-path)")]
    kv = data.get("kv_cache") if isinstance(data, dict) else None
    findings = []
    if not isinstance(kv, dict) or kv.get("dtype") != "int8":
        findings.append(Finding(f"{KV_JSON} has no kv_cache.dtype \"int8\"",
                                "write kv_cache: {dtype: int8, scaling_factor: ...}"))
        return findings
    factors = kv.get("scaling_factor")
    if not isinstance(factors, dict) or not factors:
        return [Finding(f"{KV_JSON} has no kv_cache.scaling_factor", "write per-rank, "
                        "per-layer scales")]
    for rank, layers in sorted(factors.items()):
        have = {int(k) for k in layers} if isinstance(layers, dict) else set()
        absent = sorted(set(range(md.num_layers)) - have)
        if absent:
            findings.append(Finding(f"{KV_JSON} rank {rank} has no scale for layer(s) "
                                    f"{absent[:5]}", "calibrate every attention layer"))
    return findings
