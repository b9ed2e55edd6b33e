"""vLLM fused-MoE method for modelslim experts: integer expert weights, kept integer in memory.

vLLM 0.32 gives a quantization method full control of a RoutedExperts layer: `create_weights`
registers the stacked expert tensors (`w13_*` = gate and up of every expert, `w2_*` = down), and
the model's `expert_params_mapping` turns each checkpoint name `experts.<e>.gate_proj.<suffix>`
into `experts.routed_experts.w13_<suffix>` for the layer's weight loader. That loader copies
`*weight` tensors by shard (gate / up halves of w13, down into w2) and routes names containing
"scale" or "offset" by the `quant_method` attribute of the parameter (channel or group), so the
modelslim tensors `weight`, `weight_scale` and `weight_offset` load with no renaming.

Memory: the experts stay as loaded, int8 (W4A16: two values per byte), so a quantized MoE model
serves in about its own size (DeepSeek-V2-Lite W8A8: ~16 GB instead of ~31 GB in bf16).

Compute, per expert that the router chose for at least one token, on those tokens only:
- W8A8_DYNAMIC: the expert's input is quantized per token to int8 and multiplied by the int8
  weights exactly (`w8a8_dynamic_matmul`, the dense W8A8_DYNAMIC linear's math), for gate/up
  and for down_proj alike, as the reference runtime computes;
- W8A16 / W4A16: the expert's weights are dequantized, (q - offset) x scale per channel or
  group, and multiplied in the activation dtype (what a weight-only kernel computes).
Outputs are weighted by the router and summed per token; vLLM's runner adds the shared experts
(this method has no modular kernel, so the runner runs them itself). Static W8A8 experts are
refused: each expert has its own input scale, which vLLM's MoE interface does not carry.
(vLLM 0.32's own int8 CPU experts, CPUExpertsInt8, need x86 AMX and symmetric weights; they
are not used, so results do not depend on the CPU.)
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
from vllm.model_executor.utils import set_weight_attrs

from gcupipe.quant.intmath import expand_groups
from gcupipe.vllm_plugin.description import DescriptionError
from gcupipe.vllm_plugin.linear import frozen_parameter, w8a8_dynamic_matmul

EXPERT_TYPES = ("W8A8_DYNAMIC", "W8A16", "W4A16")
"""Expert weight types this method serves (FLOAT experts use vLLM's own unquantized method)."""


class GcuFusedMoEMethod(FusedMoEMethodBase):
    """Routed experts of one modelslim weight type (see the module docstring)."""

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
        if not self.moe.is_act_and_mul or self.moe.activation.value != "silu":
            raise DescriptionError(
                f"gcu quantization: MoE layer '{self.prefix}' is not SiLU-gated (gate/up) "
                "experts; only those are supported for quantized experts"
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

    def get_fused_moe_quant_config(self, layer):  # type: ignore[no-untyped-def]
        return None  # no vLLM modular kernel runs these experts

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        if self.quant_type == "W8A8_DYNAMIC":
            layer.gcu_has_offset = any(
                bool(getattr(layer, f"{stem}_weight_offset").abs().max() > 0)
                for stem in ("w13", "w2")
            )

    def _expert_linear(self, layer, stem: str, expert: int, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
        weight = getattr(layer, f"{stem}_weight")[expert]
        scale = getattr(layer, f"{stem}_weight_scale")[expert]
        offset = getattr(layer, f"{stem}_weight_offset")[expert]
        if self.quant_type == "W8A8_DYNAMIC":  # per channel: scale, offset [n, 1]
            row_offset = offset.reshape(1, -1) if layer.gcu_has_offset else None
            return w8a8_dynamic_matmul(x, weight.t(), scale.reshape(1, -1), row_offset)
        if self.quant_type == "W4A16":
            from gcupipe.quant.packing import unpack_int4_modelslim

            weight = unpack_int4_modelslim(weight)
        k = weight.shape[-1]
        dequantized = (weight.float() - expand_groups(offset, k)) * expand_groups(scale, k)
        return torch.nn.functional.linear(x, dequantized.to(x.dtype))

    def apply(  # type: ignore[no-untyped-def]
        self,
        layer,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts,
        shared_experts_input,
    ) -> torch.Tensor:
        if layer.expert_map is not None:
            raise DescriptionError("gcu quantization: expert parallelism is not supported")
        top_k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=layer.w13_weight.shape[0]).tolist()
        tokens = order // top_k
        weights = topk_weights.reshape(-1)[order].float()
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            rows = tokens[start : start + count]
            inputs = x[rows]
            if layer.apply_router_weight_on_input:
                inputs = (inputs.float() * weights[start : start + count, None]).to(x.dtype)
            gate, up = self._expert_linear(layer, "w13", expert, inputs).chunk(2, dim=-1)
            hidden = (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)
            y = self._expert_linear(layer, "w2", expert, hidden).float()
            if not layer.apply_router_weight_on_input:
                y = y * weights[start : start + count, None]
            out.index_add_(0, rows, y)
            start += count
        return out.to(x.dtype)
