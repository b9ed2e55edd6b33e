"""`ascend`: Huawei Ascend NPUs running vllm-ascend (vllm-project/vllm-ascend at 182b75e), the
modelslim layout's own loader (`--quantization ascend`). VA = vllm_ascend/quantization/.

- VA modelslim_config.py reads quant_model_description.json and looks up `<prefix>.weight` for
  every linear it is asked about: lm_head too, also when the embeddings are tied (vLLM still
  builds a ParallelLMHead with the quant config): a missing entry is a KeyError (l.469).
  The shards of a fused module must share one type.
- Schemes (VA methods/*): W8A8 static and W8A8_DYNAMIC for linears, W8A8_DYNAMIC for MoE,
  W8A16 for linears with per-channel scales only; no W4A16 linear, no W8A16 or static-W8A8 MoE
  (its W4A16 MoE reads the llm-compressor `weight_packed` layout, not modelslim's).
- W8A8 static (VA methods/w8a8_static.py): `deq_scale` fp32 for bf16 models, int64 holding the
  fp32 bits for fp16 models; `quant_bias` int32 [n]; `input_scale` / `input_offset` [1].
- C8 KV cache (VA attention/attention_v1.py, `_forward_c8_decode`): decode dequantizes with the
  scale alone, so the offsets must be 0; `<attn>.k_proj.kv_cache_scale` maps to
  `<attn>.attn.k_cache_scale`, per channel fp32.
- compressed-tensors (VA compressed_tensors_config.py): symmetric W8A8 (static per tensor) and
  W8A8_DYNAMIC (per token) only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcupipe.formats.base import WriteOptions
from gcupipe.formats.format import QuantizationFlag
from gcupipe.formats.layout import linear_shapes
from gcupipe.formats.results import CheckOptions, Finding, Rule, Skip
from gcupipe.quant.scheme import ActivationScheme
from gcupipe.targets import kernels, plugin
from gcupipe.targets.base import Emulation, Expected, ModelFacts, Target

if TYPE_CHECKING:
    from gcupipe.formats.format import Combination, Format
    from gcupipe.formats.modeldir import ModelDir

CONFIG = "AscendModelSlimConfig (vllm_ascend/quantization/modelslim_config.py)"
LOADERS = {
    "W8A8": "AscendW8A8LinearMethod (vllm_ascend/quantization/methods/w8a8_static.py)",
    "W8A8_DYNAMIC": "AscendW8A8DynamicLinearMethod (vllm_ascend/quantization/methods/"
    "w8a8_dynamic.py)",
    "W8A16": "AscendW8A16LinearMethod (vllm_ascend/quantization/methods/w8a16.py)",
}
C8 = "AscendC8KVCacheMethod (vllm_ascend/quantization/methods/kv_c8.py)"
CASTABLE = frozenset({"F32", "F16", "BF16"})


class AscendTarget(Target):
    name = "ascend"
    summary = "vllm-ascend"
    device_resource = "NPU"
    sources = "vllm-project/vllm-ascend 182b75e"
    formats = ("modelslim", "compressed-tensors")

    def problems(
        self, fmt: Format, combo: Combination, facts: ModelFacts | None
    ) -> list[tuple[str, str]]:
        problems = super().problems(fmt, combo, facts)
        if not self.loads(fmt):
            return problems
        weight_only = combo.activation is ActivationScheme.NONE
        moe = facts is not None and facts.moe
        if fmt.name == "compressed-tensors" and (weight_only or not combo.symmetric):
            problems.append(
                (
                    "method",
                    "vllm-ascend reads compressed-tensors only as symmetric "
                    "W8A8 or W8A8_DYNAMIC (compressed_tensors_config.py)",
                )
            )
        if fmt.name == "compressed-tensors" and moe and combo.activation is ActivationScheme.STATIC:
            problems.append(
                (
                    "method",
                    "vllm-ascend's compressed-tensors W8A8 (static) scheme "
                    "is linear-only; use w8a8_dynamic for MoE models",
                )
            )
        if fmt.name != "modelslim":
            return problems
        if weight_only and combo.bits == 4:
            problems.append(
                (
                    "method",
                    "vllm-ascend registers no W4A16 scheme for linears "
                    "(vllm_ascend/quantization/methods/: W4A16 is MoE-only, in the "
                    "llm-compressor weight_packed layout)",
                )
            )
        if weight_only and combo.bits == 8 and combo.group_size:
            problems.append(
                (
                    "group_size",
                    "vllm-ascend's W8A16 takes per-channel scales only "
                    "([n, 1], methods/w8a16.py): set group_size: 0",
                )
            )
        if moe and weight_only:
            problems.append(
                (
                    "method",
                    "vllm-ascend has no W8A16 or W4A16 MoE scheme for the "
                    "modelslim layout (only W8A8_DYNAMIC experts)",
                )
            )
        if moe and combo.activation is ActivationScheme.STATIC:
            problems.append(
                (
                    "method",
                    "vllm-ascend has no static-W8A8 MoE scheme; use w8a8_dynamic for MoE models",
                )
            )
        return problems

    def flag(self, fmt: Format, base: QuantizationFlag, moe: bool) -> QuantizationFlag:
        if fmt.name == "modelslim":
            what = "modelslim (vllm-ascend's own layout)"
            return QuantizationFlag("ascend", frozenset({"ascend"}), what)
        return base

    def static_activations_symmetric(self, fmt: str) -> bool:
        return fmt == "compressed-tensors"

    def kv_cache_symmetric(self, fmt: str, method: str) -> bool:
        return True  # C8 decode dequantizes with the scale alone

    def kv_cache_dtype(self) -> str | None:
        return None  # C8 is switched on by the description's kv_cache_type, not a flag

    def write_options(self, fmt: str, facts: ModelFacts) -> WriteOptions:
        return WriteOptions(deq_scale_int64=fmt == "modelslim" and facts.dtype == "float16")

    def expected(self, md: ModelDir, fmt: Format, facts: ModelFacts) -> list[Expected]:
        if fmt.name != "modelslim":
            return []
        listed = plugin.description(md)
        found: list[Expected] = []
        for prefix, (n, _k) in linear_shapes(md).items():
            kind = str(listed.get(f"{prefix}.weight", "FLOAT"))
            loader = LOADERS.get(kind, CONFIG)
            if kind in ("W8A8", "W8A8_DYNAMIC", "W8A16"):
                found.append(Expected(f"{prefix}.weight", frozenset({"I8"}), None, loader))
                for leaf in ("weight_scale", "weight_offset"):
                    found.append(Expected(f"{prefix}.{leaf}", CASTABLE, (n, 1), loader))
            if kind == "W8A8":
                deq = frozenset({"I64"}) if facts.dtype == "float16" else frozenset({"F32"})
                found += [
                    Expected(f"{prefix}.input_scale", CASTABLE, (1,), loader),
                    Expected(f"{prefix}.input_offset", CASTABLE | {"I8"}, (1,), loader),
                    Expected(f"{prefix}.deq_scale", deq, (n,), loader),
                    Expected(f"{prefix}.quant_bias", frozenset({"I32"}), (n,), loader),
                ]
        return found

    def rules(self) -> tuple[Rule, ...]:
        return RULES

    def emulate(self, md: ModelDir, fmt: Format, prefix: str) -> Emulation | None:
        if fmt.name != "modelslim":
            return None
        kind = plugin.description(md).get(f"{prefix}.weight")
        if kind == "W8A8":
            t = md.tensor
            return kernels.static_w8a8_quant_bias(
                t(f"{prefix}.weight"),
                t(f"{prefix}.input_scale"),
                t(f"{prefix}.input_offset"),
                t(f"{prefix}.deq_scale"),
                t(f"{prefix}.quant_bias"),
            )
        return plugin.emulate(md, prefix)  # dynamic and weight-only: the same formula


def _description_entries(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    """get_linear_quant_type looks up `<prefix>.weight` for every linear vLLM builds with the
    quant config, lm_head included when the embeddings are tied (modelslim_config.py:469)."""
    if not (md.path / "quant_model_description.json").is_file():
        raise Skip("not the modelslim layout")
    listed = plugin.description(md)
    wanted = [f"{p}.weight" for p in linear_shapes(md)]
    if ModelFacts.from_config(md.config or {}).tied_embeddings:
        wanted.append("lm_head.weight")
    missing = [name for name in wanted if name not in listed]
    if not missing:
        return []
    return [
        Finding(
            f"quant_model_description.json has no entry for {missing[0]}: vllm-ascend's "
            f"{CONFIG} raises KeyError for it",
            "list it (FLOAT when it is not quantized); gcupipe's modelslim writer does",
        )
    ]


def _c8_symmetric(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    """_forward_c8_decode dequantizes the KV cache with the scale alone: a non-zero offset would
    be applied when writing the cache and ignored when reading it."""
    offsets = [n for n in md.tensors if n.endswith(".kv_cache_offset")]
    if not offsets:
        raise Skip("no C8 KV cache")
    for name in sorted(offsets):
        if bool(md.tensor(name).abs().max() > 0):
            return [
                Finding(
                    f"{name} is not 0: vllm-ascend's C8 decode ({C8}, "
                    "attention_v1.py _forward_c8_decode) reads the scale only",
                    "calibrate the KV cache symmetric (target: ascend does)",
                )
            ]
    return []


RULES = (
    Rule(
        "ascend-description-entries",
        "every linear vllm-ascend asks about, lm_head included "
        "for tied embeddings, has a description entry",
        _description_entries,
    ),
    Rule("ascend-c8-symmetric", "C8 KV-cache offsets are 0 (decode is scale-only)", _c8_symmetric),
)


TARGET = AscendTarget()
