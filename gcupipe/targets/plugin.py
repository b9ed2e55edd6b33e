"""gcupipe's own `gcu` quantization plugin as a loader: what it reads from the modelslim layout
on any vLLM (vLLM-GCU included) and what its kernels compute (vllm_plugin/linear.py, moe.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcupipe.formats.layout import linear_shapes
from gcupipe.quant.scheme import ActivationScheme
from gcupipe.targets import kernels
from gcupipe.targets.base import Emulation, Expected

if TYPE_CHECKING:
    from gcupipe.formats.format import Combination
    from gcupipe.formats.modeldir import ModelDir
    from gcupipe.targets.base import ModelFacts

LOADER = "gcupipe's gcu plugin (gcupipe/vllm_plugin/linear.py create_weights)"
F32 = frozenset({"F32"})


def problems(combo: Combination, facts: ModelFacts | None) -> list[tuple[str, str]]:
    """What the plugin cannot run: static-W8A8 experts (vLLM's fused-MoE kernels take one
    activation scale for all experts; the plugin's moe.py has no such path)."""
    if combo.activation is ActivationScheme.STATIC and facts is not None and facts.moe:
        return [
            (
                "method",
                "gcupipe's gcu plugin (vllm_plugin/moe.py) runs no static-W8A8 "
                "experts (one input scale per expert); use w8a8_dynamic for MoE models",
            )
        ]
    return []


def description(md: ModelDir) -> dict[str, object]:
    return md.json_file("quant_model_description.json") or {}


def expected(md: ModelDir) -> list[Expected]:
    """The tensors the plugin's linear and fused-MoE methods create, for each quantized module
    the description names (a FLOAT module gets vLLM's own unquantized method)."""
    listed = description(md)
    group_size = int(str(listed.get("group_size", 0) or 0))
    found: list[Expected] = []
    for prefix, (n, k) in linear_shapes(md).items():
        kind = listed.get(f"{prefix}.weight")
        if kind in (None, "FLOAT"):
            continue
        weight_k = k // 2 if kind == "W4A16" else k
        found.append(Expected(f"{prefix}.weight", frozenset({"I8"}), (n, weight_k), LOADER))
        weight_only = kind in ("W8A16", "W4A16")
        groups = k // group_size if weight_only and group_size else 1
        for leaf in ("weight_scale", "weight_offset"):
            found.append(Expected(f"{prefix}.{leaf}", F32, (n, groups), LOADER))
        if kind == "W8A8":
            for leaf in ("input_scale", "input_offset"):
                found.append(Expected(f"{prefix}.{leaf}", F32, (1,), LOADER))
            found.append(Expected(f"{prefix}.deq_scale", F32, (n,), LOADER))
            found.append(Expected(f"{prefix}.quant_bias", frozenset({"I32"}), (n,), LOADER))
    return found


def emulate(md: ModelDir, prefix: str) -> Emulation | None:
    """The plugin's kernel for one module (vllm_plugin/linear.py apply): the int8 GEMM with
    per-token activations, the static quant_bias / deq_scale form, or (q - offset) * scale."""
    kind = description(md).get(f"{prefix}.weight")
    if kind in (None, "FLOAT"):
        return None
    t = md.tensor
    bias = t(f"{prefix}.bias") if f"{prefix}.bias" in md.tensors else None
    if kind == "W8A8_DYNAMIC":
        return kernels.per_token_w8a8(t(f"{prefix}.weight"), t(f"{prefix}.weight_scale"), bias)
    if kind == "W8A8":
        return kernels.static_w8a8_quant_bias(
            t(f"{prefix}.weight"),
            t(f"{prefix}.input_scale"),
            t(f"{prefix}.input_offset"),
            t(f"{prefix}.deq_scale"),
            t(f"{prefix}.quant_bias"),
        )
    q = t(f"{prefix}.weight")
    if kind == "W4A16":
        q = kernels.int4_low_nibble_first(q)
    return kernels.weight_only(q, t(f"{prefix}.weight_scale"), t(f"{prefix}.weight_offset"), bias)
