"""`gcu`: Enflame GCU machines running vLLM-GCU (EnflameTechnology/vllm-gcu at 7b5aaca, which
patches vLLM 0.9.2). VG = vllm_gcu/kernels/quantization/.

- GPTQ (VG gptq.py, `GPTQGCUConfig`, name gptq_gcu, chosen for quant_method gptq): every
  LinearBase gets the GPTQ method; the `dynamic` overrides are read but never consulted, so a
  linear cannot stay float. 4 or 8 bits, 8 symmetric only (every stored zero byte 127), g_idx
  contiguous, groups of 64 or a multiple. `get_quant_method` returns nothing for FusedMoE.
- AWQ (VG awq.py): 4 bits, groups of 64; `modules_to_not_convert` is the skip list (substring
  match). Nothing for FusedMoE either.
- MoE with GPTQ/AWQ (VG moe_wna16.py, `MoeWNA16GCUConfig`): the only path for quantized experts,
  chosen only when `--quantization moe_wna16_gcu` is passed; its `from_config` needs quant_method,
  bits, group_size, `sym` (GPTQ), `zero_point` and `modules_to_not_convert` (AWQ, null allowed).
- W8A8 (VG w8a8.py, `W8A8Config`, name w8a8_gcu, chosen for quant_method w8a8): every LinearBase
  quantized (no skip list), `weight` int8 [n, k], `out_scales` fp32 [n], `in_scales` [k] in the
  params dtype (a divisor); experts via FusedW8A8MoEMethod (`out_scales`/`in_scales` per expert).
  Its Int8KVCacheMethod (VG kv_cache.py) creates per-tensor `k_scale`, `v_scale`, `k_zero`,
  `v_zero` on the attention layer: vLLM 0.9.2's maybe_remap_kv_scale_name maps
  `<attn>.k_scale` there but has no rule for `*_zero`, which must be named `<attn>.attn.k_zero`.
  GPTQ/AWQ attach vLLM's own BaseKVCacheMethod: scales only, no zero points.
- compressed-tensors (VG compressed_tensor.py): the int8 kernel takes symmetric activations only.
- modelslim: through gcupipe's `gcu` plugin. Nothing in vllm-gcu reads modelslim's C8
  `kv_cache_scale` / `kv_cache_offset`, so an int8 KV cache cannot come from that layout here.
- vLLM 0.9.2 has no `--quantization-param-path` and its QuantParamSchema accepts only
  float8_e4m3fn: the int8 KV cache is read from the checkpoint tensors above, nowhere else.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gcupipe.formats.format import QuantizationFlag
from gcupipe.formats.gcu_io import bits_and_group_size, gcu_settings
from gcupipe.formats.layout import linear_shapes
from gcupipe.formats.registry import format_of
from gcupipe.formats.results import CheckOptions, Finding, Rule, Skip
from gcupipe.quant.scheme import ActivationScheme
from gcupipe.targets import kernels, plugin, upstream
from gcupipe.targets.base import Emulation, Expected, ModelFacts, Target

if TYPE_CHECKING:
    from gcupipe.formats.format import Combination, Format
    from gcupipe.formats.modeldir import ModelDir

GROUP_QUANTUM = 64
GPTQ = "GPTQGCULinearMethod.create_weights (vllm_gcu/kernels/quantization/gptq.py)"
GPTQ_MOE = "MoeWNA16GCUMethod.create_weights (vllm_gcu/kernels/quantization/moe_wna16.py)"
AWQ = "AWQGCULinearMethod.create_weights (vllm_gcu/kernels/quantization/awq.py)"
W8A8 = "W8A8LinearMethod.create_weights (vllm_gcu/kernels/quantization/w8a8.py)"
W8A8_MOE = "FusedW8A8MoEMethod.create_weights (vllm_gcu/kernels/quantization/w8a8.py)"
KV = "GCUBaseKVCacheMethod.create_weights (vllm_gcu/kernels/quantization/kv_cache.py)"
EXPERT = re.compile(r"\.mlp\.experts\.\d+\.")


class GcuTarget(Target):
    name = "gcu"
    summary = "vLLM-GCU"
    device_resource = "GCU"
    sources = "EnflameTechnology/vllm-gcu 7b5aaca, which patches vLLM 0.9.2"
    formats = ("modelslim", "gcu", "compressed-tensors")

    def problems(
        self, fmt: Format, combo: Combination, facts: ModelFacts | None
    ) -> list[tuple[str, str]]:
        problems = super().problems(fmt, combo, facts)
        if not self.loads(fmt):
            return problems
        if fmt.name == "modelslim":
            problems += plugin.problems(combo, facts)
        if fmt.name == "compressed-tensors":
            problems += upstream.compressed_tensors_problems(combo, facts)
        if fmt.name == "modelslim" and combo.kv_cache:
            problems.append(
                (
                    "kv_cache",
                    "nothing in vLLM-GCU reads the modelslim C8 scales "
                    "(kv_cache_scale/offset); for an int8 KV cache on GCU use format "
                    "gcu with method w8a8 (Int8KVCacheMethod, vllm_gcu/kernels/"
                    "quantization/kv_cache.py)",
                )
            )
        if fmt.name == "gcu":
            problems += _kernel_problems(combo)
        if fmt.name == "gcu" and combo.method != "awq":
            kept = [p for p in combo.float_linears if not upstream.FLOATS_ALLOWED.search(p)]
            if kept:
                loader = (
                    "W8A8Config"
                    if combo.activation is ActivationScheme.STATIC
                    else ("GPTQGCUConfig")
                )
                problems.append(
                    (
                        "ignore",
                        f"{loader}.get_quant_method quantizes every "
                        f"LinearBase (vLLM-GCU has no skip list for it), so {kept[0]} "
                        "cannot stay float; quantize it, or use method awq "
                        "(modules_to_not_convert) or format modelslim",
                    )
                )
        return problems

    def flag(self, fmt: Format, base: QuantizationFlag, moe: bool) -> QuantizationFlag:
        if fmt.name == "gcu" and base.value in ("gptq", "awq") and moe:
            what = f"MoE {base.value} in the gcu layout (only MoeWNA16GCUConfig loads its experts)"
            return QuantizationFlag("moe_wna16_gcu", frozenset({"moe_wna16_gcu"}), what)
        return base

    def kv_cache_dtype(self) -> str | None:
        return "int8"

    def static_activations_symmetric(self, fmt: str) -> bool:
        return fmt in ("gcu", "compressed-tensors")  # in_scales only; CT int8 kernel: symmetric

    def kv_cache_symmetric(self, fmt: str, method: str) -> bool:
        return method != "w8a8"  # BaseKVCacheMethod (GPTQ/AWQ) reads no zero points

    def expected(self, md: ModelDir, fmt: Format, facts: ModelFacts) -> list[Expected]:
        if fmt.name == "modelslim":
            return plugin.expected(md)
        if fmt.name == "compressed-tensors":
            return upstream.compressed_tensors_expected(md)
        method = str(md.quant_method)
        if method in ("gptq", "awq"):
            listed = [str(m) for m in gcu_settings(md).get("modules_to_not_convert") or []]

            def skipped(prefix: str) -> bool:  # GPTQ: no skip list on GCU; AWQ: substrings
                return method == "awq" and any(entry in prefix for entry in listed)

            def loader(prefix: str) -> str:
                return GPTQ_MOE if EXPERT.search(prefix) else (AWQ if method == "awq" else GPTQ)

            found = upstream.gptq_awq_expected(md, skipped, loader)
        else:
            found = _w8a8_expected(md)
        return found + _kv_expected(md, method)

    def rules(self) -> tuple[Rule, ...]:
        return RULES

    def emulate(self, md: ModelDir, fmt: Format, prefix: str) -> Emulation | None:
        if fmt.name == "modelslim":
            return plugin.emulate(md, prefix)
        if fmt.name == "compressed-tensors":
            return upstream.compressed_tensors_kernel(md, prefix)
        return gcu_layout_kernel(md, prefix)


def _w8a8_expected(md: ModelDir) -> list[Expected]:
    """W8A8LinearMethod / FusedW8A8MoEMethod: every linear the quant config reaches."""
    found = []
    for prefix, (n, k) in linear_shapes(md).items():
        if upstream.FLOATS_ALLOWED.search(prefix):
            continue
        loader = W8A8_MOE if EXPERT.search(prefix) else W8A8
        found += [
            Expected(f"{prefix}.weight", frozenset({"I8"}), (n, k), loader),
            Expected(f"{prefix}.out_scales", frozenset({"F32"}), None, loader),
            Expected(f"{prefix}.in_scales", upstream.PARAMS_DTYPES, None, loader),
        ]
    return found


def _kv_expected(md: ModelDir, method: str) -> list[Expected]:
    """The per-tensor KV parameters on every attention layer, when the files carry a KV cache:
    GCUBaseKVCacheMethod's four for w8a8, vLLM's BaseKVCacheMethod's scales for GPTQ/AWQ."""
    if not any(name.endswith(".self_attn.k_scale") for name in md.tensors):
        return []
    leaves = ["k_scale", "v_scale"] + (["attn.k_zero", "attn.v_zero"] if method == "w8a8" else [])
    loader = KV if method == "w8a8" else "BaseKVCacheMethod (vllm/.../quantization/kv_cache.py)"
    return [
        Expected(f"model.layers.{index}.self_attn.{leaf}", frozenset({"F32"}), None, loader)
        for index in range(md.num_layers)
        for leaf in leaves
    ]


def _kernel_problems(combo: Combination) -> list[tuple[str, str]]:
    """What the vLLM-GCU GPTQ/AWQ kernels take (gptq.py, awq.py, docs: quantization.md)."""
    problems = []
    weight_only = combo.activation is ActivationScheme.NONE
    if weight_only and combo.bits == 8 and not combo.symmetric:
        problems.append(
            (
                "symmetric",
                "the vLLM-GCU 8-bit GPTQ loader asserts every stored zero "
                "point is 127 (symmetric); set symmetric: true",
            )
        )
    if weight_only and combo.bits == 4 and combo.group_size == 0:
        problems.append(
            (
                "group_size",
                "the vLLM-GCU 4-bit GPTQ/AWQ kernels need grouped scales "
                "(group_size 64 or a multiple)",
            )
        )
    elif weight_only and combo.bits == 4 and combo.group_size % GROUP_QUANTUM:
        problems.append(
            (
                "group_size",
                "the vLLM-GCU 4-bit kernels need a group size that is a "
                f"multiple of 64, got {combo.group_size}",
            )
        )
    if combo.method == "awq" and combo.group_size != GROUP_QUANTUM:
        problems.append(("group_size", "the vLLM-GCU AWQ path takes group size 64 exactly"))
    return problems


def gcu_layout_kernel(md: ModelDir, prefix: str) -> Emulation | None:
    """The GPTQ, AWQ (vLLM's own, subclassed) or W8A8 kernel for one module (None: float)."""
    if f"{prefix}.out_scales" not in md.tensors:
        return upstream.gptq_awq_kernel(md, prefix)
    t = md.tensor
    bias = t(f"{prefix}.bias") if f"{prefix}.bias" in md.tensors else None
    return kernels.gcu_w8a8(
        t(f"{prefix}.weight"), t(f"{prefix}.out_scales"), t(f"{prefix}.in_scales"), bias
    )


def _gcu_layout(md: ModelDir) -> str:
    fmt = format_of(md)
    if fmt is None or fmt.name != "gcu":
        raise Skip("not the gcu layout")
    return str(md.quant_method)


def _kernel_group_size(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    method = _gcu_layout(md)
    if method not in ("gptq", "awq"):
        raise Skip(f"{method}: no weight groups")
    bits, group = bits_and_group_size(gcu_settings(md))
    if method == "awq" and group != GROUP_QUANTUM:
        return [
            Finding(
                f"AWQ group_size is {group or 'per channel'}; {AWQ} takes exactly 64",
                "re-quantize with group_size: 64",
            )
        ]
    if bits == 4 and not group:
        return [
            Finding(
                f"4-bit GPTQ per channel: {GPTQ} needs groups (g_idx.reshape([-1, group_size]))",
                "re-quantize with group_size: 64 (or a multiple)",
            )
        ]
    if group % GROUP_QUANTUM:
        return [
            Finding(
                f"GPTQ group_size {group} is not 64 or a multiple of 64, which the "
                "vLLM-GCU kernels require",
                "re-quantize with group_size: 64, 128, ...",
            )
        ]
    return []


def _g_idx_contiguous(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    if _gcu_layout(md) != "gptq":
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
    if _gcu_layout(md) != "gptq" or bits_and_group_size(gcu_settings(md))[0] != 8:
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


LOADER_KEYS = {
    "gptq": ("GPTQGCUConfig.from_config (gptq.py)", (("bits",), ("group_size",), ("desc_act",))),
    "awq": (
        "AWQConfig.from_config (vLLM awq.py, which AWQGCUConfig inherits)",
        (("bits", "w_bit"), ("group_size", "q_group_size"), ("zero_point",)),
    ),
    "w8a8": ("W8A8Config.from_config (w8a8.py)", (("group_size",),)),
}
"""quantization_config keys each loader's from_config requires (any one of a tuple)."""
MOE_KEYS = {"gptq": (("sym",),), "awq": (("modules_to_not_convert",),)}
"""... and what MoeWNA16GCUConfig.from_config (moe_wna16.py) requires on top for MoE models."""


def _loader_config(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    method = _gcu_layout(md)
    settings = gcu_settings(md)
    loader, required = LOADER_KEYS[method]
    if method in MOE_KEYS and ModelFacts.from_config(md.config or {}).moe:
        loader = "MoeWNA16GCUConfig.from_config (moe_wna16.py)"
        required = (*required, *MOE_KEYS[method])
    missing = [keys for keys in required if not any(key in settings for key in keys)]
    if not missing:
        return []
    names = " or ".join(repr(key) for key in missing[0])
    return [
        Finding(
            f"quantization_config has no {names}: vLLM-GCU's {loader} raises ValueError "
            "(get_from_keys) for it",
            "re-write the model with the quantize stage (target: gcu)",
        )
    ]


def _ct_symmetric_activations(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    """CompressedTensorMMLinearKernel.can_implement (compressed_tensor.py) refuses a scheme
    whose input activations are not symmetric, and it is the only int8 kernel on GCU."""
    fmt = format_of(md)
    if fmt is None or fmt.name != "compressed-tensors":
        raise Skip("not compressed-tensors")
    groups = ((md.quantization_config or {}).get("config_groups") or {}).items()
    for name, group in sorted(groups):
        activations = group.get("input_activations") or {}
        if activations and not activations.get("symmetric", True):
            return [
                Finding(
                    f"config_groups.{name}: asymmetric input activations; vLLM-GCU's "
                    "CompressedTensorMMLinearKernel only supports symmetric quantization",
                    "re-quantize for target gcu (its static activations are symmetric)",
                )
            ]
    return []


RULES = (
    Rule(
        "gcu-loader-config",
        "quantization_config has every key the vLLM-GCU loader's from_config requires",
        _loader_config,
    ),
    Rule(
        "gcu-ct-symmetric-activations",
        "compressed-tensors int8 activations are symmetric (the one GCU kernel takes no others)",
        _ct_symmetric_activations,
    ),
    Rule(
        "gcu-group-size",
        "groups fit the vLLM-GCU kernels (GPTQ 4-bit: 64 or a multiple; AWQ: exactly 64)",
        _kernel_group_size,
    ),
    Rule(
        "gcu-g-idx-contiguous",
        "GPTQ g_idx is i // group_size and desc_act is off (vLLM-GCU applies no act-order shuffle)",
        _g_idx_contiguous,
    ),
    Rule(
        "gcu-gptq-int8-symmetric",
        "8-bit GPTQ zero points are all 128 (the vLLM-GCU 8-bit path asserts it)",
        _gptq_int8_symmetric,
    ),
)


TARGET = GcuTarget()
