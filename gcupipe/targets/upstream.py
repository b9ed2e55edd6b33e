"""Upstream vLLM's own quantization classes, which several targets share: its GPTQ and AWQ
linear methods (vLLM-GCU's subclass them; V = vllm/model_executor/layers/quantization/) and its
compressed-tensors schemes (vLLM-GCU keeps them, swapping in its own int8 kernel). What each
creates for a module, and what its kernel computes, from the files' raw tensors."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from gcupipe.formats.gcu_io import bits_and_group_size, gcu_settings
from gcupipe.formats.layout import linear_shapes
from gcupipe.targets import kernels
from gcupipe.targets.base import Emulation, Expected

if TYPE_CHECKING:
    from gcupipe.formats.format import Combination
    from gcupipe.formats.modeldir import ModelDir
    from gcupipe.targets.base import ModelFacts

GPTQ = "GPTQLinearMethod.create_weights (V gptq.py)"
AWQ = "AWQLinearMethod.create_weights (V awq.py)"
CT_INT8 = "CompressedTensorsW8A8Int8.create_weights (V compressed_tensors/schemes/)"
CT_WNA16 = "CompressedTensorsWNA16.create_weights (V compressed_tensors/schemes/)"
FLOATS_ALLOWED = re.compile(r"(^lm_head$|\.mlp\.gate$)")
"""Linears vLLM builds without the quant config (lm_head is a ParallelLMHead, MoE routers are
ReplicatedLinear(quant_config=None)): float in every layout."""
PARAMS_DTYPES = frozenset({"F16", "BF16", "F32"})
"""Parameters vLLM creates in the model's dtype: the loader casts any float into them."""
I32 = frozenset({"I32"})


def gptq_awq_expected(
    md: ModelDir, skipped: Callable[[str], bool], loader: Callable[[str], str]
) -> list[Expected]:
    """The GPTQ (qweight packed along k, g_idx) or AWQ-gemm (packed along n) parameters of every
    linear the quant config reaches and `skipped` does not; `loader(prefix)` names the class."""
    settings = gcu_settings(md)
    bits, group = bits_and_group_size(settings)
    awq = md.quant_method == "awq"
    found: list[Expected] = []
    for prefix, (n, k) in linear_shapes(md).items():
        if FLOATS_ALLOWED.search(prefix) or skipped(prefix):
            continue
        groups = k // group if group else 1
        by = loader(prefix)
        if awq:
            found += [
                Expected(f"{prefix}.qweight", I32, (k, n // 8), by),
                Expected(f"{prefix}.qzeros", I32, (groups, n // 8), by),
                Expected(f"{prefix}.scales", PARAMS_DTYPES, (groups, n), by),
            ]
        else:
            found += [
                Expected(f"{prefix}.qweight", I32, (k * bits // 32, n), by),
                Expected(f"{prefix}.qzeros", I32, (groups, n * bits // 32), by),
                Expected(f"{prefix}.scales", PARAMS_DTYPES, (groups, n), by),
                Expected(f"{prefix}.g_idx", I32, (k,), by),
            ]
    return found


def gptq_awq_kernel(md: ModelDir, prefix: str) -> Emulation | None:
    """GPTQ v1 or AWQ gemm for one module, from its raw tensors (None: not packed)."""
    if f"{prefix}.qweight" not in md.tensors:
        return None
    t = md.tensor
    bias = t(f"{prefix}.bias") if f"{prefix}.bias" in md.tensors else None
    bits, group = bits_and_group_size(gcu_settings(md))
    qweight, qzeros, scales = (t(f"{prefix}.{leaf}") for leaf in ("qweight", "qzeros", "scales"))
    if md.quant_method == "awq":
        return kernels.awq_gemm(qweight, qzeros, scales, group, bias)
    return kernels.gptq_v1(qweight, qzeros, scales, t(f"{prefix}.g_idx"), bits, bias)


def _ct_groups(md: ModelDir) -> list[tuple[re.Pattern[str], dict[str, object]]]:
    """(module pattern, scheme) per config group, as vLLM matches `targets` (a class name or
    "re:" regex) against a module; gcupipe writes Linear targets, so any linear matches."""
    groups = ((md.quantization_config or {}).get("config_groups") or {}).values()
    out = []
    for group in groups:
        for target in group.get("targets") or ["Linear"]:
            pattern = target[3:] if str(target).startswith("re:") else ".*"
            out.append((re.compile(pattern), group))
    return out


def _ct_ignored(md: ModelDir, prefix: str) -> bool:
    for entry in (md.quantization_config or {}).get("ignore") or []:
        entry = str(entry)
        if entry == prefix or (entry.startswith("re:") and re.match(entry[3:], prefix)):
            return True
    return False


def _ct_scheme(md: ModelDir, prefix: str) -> dict[str, object] | None:
    if _ct_ignored(md, prefix) or FLOATS_ALLOWED.search(prefix):
        return None
    for pattern, group in _ct_groups(md):
        if pattern.match(prefix):
            return group
    return None


def compressed_tensors_expected(md: ModelDir) -> list[Expected]:
    """The parameters vLLM's compressed-tensors schemes create: int-quantized W8A8 (weight int8,
    per-channel weight_scale, static input_scale and, asymmetric, input_zero_point) and the
    pack-quantized weight-only layout (weight_packed, weight_scale per group, weight_shape and,
    asymmetric, the packed weight_zero_point)."""
    packed = (md.quantization_config or {}).get("format") == "pack-quantized"
    found: list[Expected] = []
    for prefix, (n, k) in linear_shapes(md).items():
        scheme = _ct_scheme(md, prefix)
        if scheme is None:
            continue
        weights = dict(scheme.get("weights") or {})  # type: ignore[call-overload]
        activations = scheme.get("input_activations")
        bits = int(weights.get("num_bits", 8))
        group = int(weights.get("group_size") or 0)
        groups = k // group if group else 1
        symmetric = bool(weights.get("symmetric", True))
        if packed:
            found += [
                Expected(f"{prefix}.weight_packed", I32, (n, k * bits // 32), CT_WNA16),
                Expected(f"{prefix}.weight_scale", PARAMS_DTYPES, (n, groups), CT_WNA16),
                Expected(f"{prefix}.weight_shape", frozenset({"I64", "I32"}), (2,), CT_WNA16),
            ]
            if not symmetric:
                shape = (n * bits // 32, groups)
                found.append(Expected(f"{prefix}.weight_zero_point", I32, shape, CT_WNA16))
            continue
        found += [
            Expected(f"{prefix}.weight", frozenset({"I8"}), (n, k), CT_INT8),
            Expected(f"{prefix}.weight_scale", PARAMS_DTYPES, (n, 1), CT_INT8),
        ]
        if isinstance(activations, dict) and not activations.get("dynamic"):
            found.append(Expected(f"{prefix}.input_scale", PARAMS_DTYPES, (1,), CT_INT8))
            if not activations.get("symmetric", True):
                zero = frozenset({"I8", "I32"})
                found.append(Expected(f"{prefix}.input_zero_point", zero, (1,), CT_INT8))
    return found


def compressed_tensors_kernel(md: ModelDir, prefix: str) -> Emulation | None:
    """The scheme's formula for one module, from the raw tensors (None: float)."""
    t = md.tensor
    bias = t(f"{prefix}.bias") if f"{prefix}.bias" in md.tensors else None
    scheme = _ct_scheme(md, prefix)
    if scheme is None:
        return None
    if f"{prefix}.weight_packed" in md.tensors:
        weights = dict(scheme.get("weights") or {})  # type: ignore[call-overload]
        zero = (
            t(f"{prefix}.weight_zero_point")
            if f"{prefix}.weight_zero_point" in md.tensors
            else None
        )
        return kernels.compressed_tensors_wna16(
            t(f"{prefix}.weight_packed"),
            t(f"{prefix}.weight_scale"),
            zero,
            int(weights.get("num_bits", 4)),
            bias,
        )
    if f"{prefix}.input_scale" in md.tensors:
        zero_name = f"{prefix}.input_zero_point"
        return kernels.static_int8(
            t(f"{prefix}.weight"),
            t(f"{prefix}.weight_scale"),
            t(f"{prefix}.input_scale"),
            t(zero_name) if zero_name in md.tensors else None,
            bias,
        )
    return kernels.per_token_w8a8(t(f"{prefix}.weight"), t(f"{prefix}.weight_scale"), bias)


def compressed_tensors_problems(
    combo: Combination, facts: ModelFacts | None
) -> list[tuple[str, str]]:
    """Its int8 experts (CompressedTensorsW8A8Int8MoEMethod) take dynamic per-token
    activations only."""
    from gcupipe.quant.scheme import ActivationScheme

    if combo.activation is ActivationScheme.STATIC and facts is not None and facts.moe:
        return [
            (
                "method",
                "vLLM's CompressedTensorsW8A8Int8MoEMethod (compressed_tensors_moe_w8a8_int8.py) "
                "refuses static input scales; use w8a8_dynamic for MoE models",
            )
        ]
    return []
