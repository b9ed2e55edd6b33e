"""vLLM fused-MoE method for modelslim experts: integer expert weights loaded, run as float.

vLLM 0.32 gives a quantization method full control of a RoutedExperts layer: `create_weights`
registers the stacked expert tensors (`w13_*` = gate and up of every expert, `w2_*` = down), and
the model's `expert_params_mapping` turns each checkpoint name `experts.<e>.gate_proj.<suffix>`
into `experts.routed_experts.w13_<suffix>` for the layer's weight loader. That loader copies
`*weight` tensors by shard (gate / up halves of w13, down into w2) and routes names containing
"scale" or "offset" by the `quant_method` attribute of the parameter (channel or group), so the
modelslim tensors `weight`, `weight_scale` and `weight_offset` load with no renaming.

Compute: the simplest faithful one on every platform. The experts are dequantized once after
loading, (q - offset) x scale per channel or group (what a weight-only kernel computes), and
vLLM's unquantized fused-MoE path runs them. (vLLM 0.32 also has int8 CPU experts,
CPUExpertsInt8: x86 AMX only, symmetric per-channel weights with per-token activations, set up
through its own int8 oracle; they are not used here, so results do not depend on the CPU.)
See `GcuFusedMoEMethod` for what this means for W8A8_DYNAMIC.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
    UnquantizedFusedMoEMethod,
)
from vllm.model_executor.utils import set_weight_attrs

from gcupipe.quant.intmath import expand_groups, fake_quantize_per_token
from gcupipe.vllm_plugin.description import DescriptionError
from gcupipe.vllm_plugin.linear import frozen_parameter

EXPERT_TYPES = ("W8A8_DYNAMIC", "W8A16", "W4A16")
"""Expert weight types this method serves (FLOAT experts use vLLM's own unquantized method)."""


class GcuFusedMoEMethod(UnquantizedFusedMoEMethod):
    """Routed experts of one modelslim weight type, dequantized once to the layer's dtype.

    W8A16 / W4A16: the result is what a weight-only MoE kernel computes.
    W8A8_DYNAMIC: the experts' input (what gate_proj and up_proj see) is rounded per token to
    int8 levels before vLLM's fused kernel, so the first GEMM is the int8 GEMM up to float
    rounding (in bf16, the rounded values are themselves rounded to bf16). The input of down_proj
    is made inside that kernel (activation(gate) x up) and is NOT quantized on this path:
    down_proj runs weight-only, where the reference runtime rounds that input to int8 too (an
    error of up to 1/254 of each token's largest value). Logprobs therefore agree to that
    rounding, not bit for bit; on the tiny DeepSeek-V2 of the tests it is below bf16 noise.
    Static W8A8 experts are refused: each expert has its own input scale, and the fused path
    takes one input for all experts.
    """

    def __init__(self, moe, quant_type: str, group_size: int, prefix: str):  # type: ignore[no-untyped-def]
        if quant_type not in EXPERT_TYPES:
            raise DescriptionError(
                f"gcu quantization: MoE experts under '{prefix}' are {quant_type}; this plugin "
                f"serves experts of types {', '.join(EXPERT_TYPES)} or FLOAT (a static W8A8 "
                "expert needs its own input scale, which vLLM's fused MoE path, one input for "
                "all experts, cannot apply): quantize experts with one of those"
            )
        super().__init__(moe)
        self.quant_type = quant_type
        self.group_size = group_size if quant_type != "W8A8_DYNAMIC" else 0
        self.prefix = prefix

    def create_weights(  # type: ignore[no-untyped-def]
        self,
        layer,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        if not self.moe.is_act_and_mul:
            raise DescriptionError(
                f"gcu quantization: MoE layer '{self.prefix}' has no gated (gate/up) experts; "
                "only gated experts are supported for quantized experts"
            )
        up_size = 2 * intermediate_size_per_partition
        # (stem, output features n, input features k) of each stacked expert tensor
        shapes = (
            ("w13", up_size, hidden_size),
            ("w2", hidden_size, intermediate_size_per_partition),
        )
        packing = 2 if self.quant_type == "W4A16" else 1
        for stem, n, k in shapes:
            if k % packing:
                raise DescriptionError(
                    f"gcu quantization: W4A16 experts of '{self.prefix}' have odd k={k}"
                )
            if self.group_size and k % self.group_size:
                raise DescriptionError(
                    f"gcu quantization: group_size {self.group_size} does not divide the {k} "
                    f"input features of the {stem} experts of '{self.prefix}'"
                )
            weight = frozen_parameter(torch.empty(num_experts, n, k // packing, dtype=torch.int8))
            layer.register_parameter(f"{stem}_weight", weight)
            set_weight_attrs(weight, extra_weight_attrs)
            groups = k // self.group_size if self.group_size else 1
            kind = (
                FusedMoeWeightScaleSupported.GROUP
                if self.group_size
                else FusedMoeWeightScaleSupported.CHANNEL
            )
            for name in ("weight_scale", "weight_offset"):
                param = frozen_parameter(torch.empty(num_experts, n, groups, dtype=torch.float32))
                layer.register_parameter(f"{stem}_{name}", param)
                set_weight_attrs(param, {**extra_weight_attrs, "quant_method": kind.value})
        layer.gcu_params_dtype = params_dtype

    def _dequantized(self, layer, stem: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
        weight = getattr(layer, f"{stem}_weight").data
        if self.quant_type == "W4A16":
            from gcupipe.quant.packing import unpack_int4_modelslim

            weight = unpack_int4_modelslim(weight)
        k = weight.shape[-1]  # per group: one value per input feature
        scale = expand_groups(getattr(layer, f"{stem}_weight_scale").data, k)
        offset = expand_groups(getattr(layer, f"{stem}_weight_offset").data, k)
        dequantized: torch.Tensor = (weight.float() - offset) * scale
        return dequantized.to(layer.gcu_params_dtype).contiguous()

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        for stem in ("w13", "w2"):
            dequantized = self._dequantized(layer, stem)
            delattr(layer, f"{stem}_weight_scale")
            delattr(layer, f"{stem}_weight_offset")
            delattr(layer, f"{stem}_weight")
            layer.register_parameter(f"{stem}_weight", frozen_parameter(dequantized))
        # from here on a float MoE layer: vLLM prepares its own kernel layout
        super().process_weights_after_loading(layer)

    def apply(  # type: ignore[no-untyped-def,override]
        self,
        layer,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts,
        shared_experts_input,
    ) -> torch.Tensor:
        if self.quant_type == "W8A8_DYNAMIC":
            x = fake_quantize_per_token(x)  # shared experts keep their own input
        return super().apply(layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input)
