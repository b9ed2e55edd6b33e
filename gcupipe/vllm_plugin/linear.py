"""vLLM linear methods for the modelslim types: the integer math in plain torch, any platform.

The kernels are deliberately portable (torch._int_mm on CPU, float matmul elsewhere) rather than
fast: the point of the plugin is to prove a modelslim artifact numerically on ordinary vLLM
before it reaches a GCU machine, where vLLM-GCU's own kernels take over.
"""

from __future__ import annotations

import os

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PerTensorScaleParameter,
)

from gcupipe.quant.intmath import (
    expand_groups,
    int8_matmul,
    quantize_per_tensor,
    quantize_per_token,
)
from gcupipe.vllm_plugin.description import DescriptionError
from gcupipe.vllm_plugin.settings import LOW_MEMORY_ENV


def frozen_parameter(tensor: torch.Tensor) -> Parameter:
    return Parameter(tensor, requires_grad=False)


class _ModelslimLinearMethod(LinearMethodBase):
    """Shared parameter creation; subclasses add their tensors and `apply`."""

    quant_type = "FLOAT"

    def __init__(self, group_size: int, prefix: str):
        self.group_size = group_size
        self.prefix = prefix

    def _weight(self, layer, n: int, k: int, loader, attrs) -> None:  # type: ignore[no-untyped-def]
        packed_k = k // 2 if self.quant_type == "W4A16" else k
        weight = ModelWeightParameter(
            data=torch.empty(n, packed_k, dtype=torch.int8),
            input_dim=1,
            output_dim=0,
            weight_loader=loader,
        )
        layer.register_parameter("weight", weight)

    def _weight_scales(self, layer, n: int, k: int, loader, per_group: bool) -> None:  # type: ignore[no-untyped-def]
        for name in ("weight_scale", "weight_offset"):
            if per_group:
                if k % self.group_size:
                    raise DescriptionError(
                        f"gcu quantization: group_size {self.group_size} does not divide the "
                        f"{k} input features of layer '{self.prefix}'"
                    )
                param = GroupQuantScaleParameter(
                    data=torch.empty(n, k // self.group_size, dtype=torch.float32),
                    input_dim=1,
                    output_dim=0,
                    weight_loader=loader,
                )
            else:
                param = ChannelQuantScaleParameter(  # type: ignore[assignment]
                    data=torch.empty(n, 1, dtype=torch.float32), output_dim=0, weight_loader=loader
                )
            layer.register_parameter(name, param)


@register_weight_loader_v2_supported_method
class GcuWeightOnlyLinearMethod(_ModelslimLinearMethod):
    """W8A16 / W4A16: (q - offset) * scale in fp32, cast to the activation dtype, float matmul.

    By default the dequantized weight is computed once at load (what a weight-only kernel
    computes on the fly, so the results are identical); see LOW_MEMORY_ENV."""

    def __init__(self, quant_type: str, group_size: int, prefix: str):
        super().__init__(group_size, prefix)
        self.quant_type = quant_type
        self.low_memory = os.environ.get(LOW_MEMORY_ENV, "0") not in ("", "0", "false")

    def create_weights(  # type: ignore[no-untyped-def]
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        if self.quant_type == "W4A16" and k % 2:
            raise DescriptionError(f"gcu quantization: W4A16 layer '{self.prefix}' has odd k={k}")
        self._weight(layer, n, k, loader, extra_weight_attrs)
        self._weight_scales(layer, n, k, loader, per_group=self.group_size > 0)
        layer.gcu_params_dtype = params_dtype

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        weight = layer.weight.data
        if self.quant_type == "W4A16":
            from gcupipe.quant.packing import unpack_int4_modelslim

            weight = unpack_int4_modelslim(weight)
        k = weight.shape[1]  # per group: one value per input feature, expanded once
        scale = expand_groups(layer.weight_scale.data, k)
        offset = expand_groups(layer.weight_offset.data, k)
        if not self.low_memory:
            from vllm.model_executor.layers.linear import UnquantizedLinearMethod

            dequantized = ((weight.float() - offset) * scale).to(layer.gcu_params_dtype)
            layer.weight = frozen_parameter(dequantized.contiguous())
            del layer.weight_scale, layer.weight_offset
            # from here on it is a float layer: vLLM's own GEMM path for the platform
            self.float_method = UnquantizedLinearMethod()
            self.float_method.process_weights_after_loading(layer)
            layer.gcu_dequantized = True
            return
        layer.weight = frozen_parameter(weight.contiguous())
        layer.weight_scale = frozen_parameter(scale.contiguous())
        layer.weight_offset = frozen_parameter(offset.contiguous())
        layer.gcu_dequantized = False

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if layer.gcu_dequantized:
            return self.float_method.apply(layer, x, bias)
        weight = ((layer.weight.float() - layer.weight_offset) * layer.weight_scale).to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


@register_weight_loader_v2_supported_method
class GcuW8A8DynamicLinearMethod(_ModelslimLinearMethod):
    """W8A8_DYNAMIC: symmetric int8 per-token activations computed at run time."""

    quant_type = "W8A8_DYNAMIC"

    def create_weights(  # type: ignore[no-untyped-def]
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        self._weight(layer, n, k, loader, extra_weight_attrs)
        self._weight_scales(layer, n, k, loader, per_group=False)

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        layer.weight = frozen_parameter(layer.weight.data.t())  # [k, n] view for int8_matmul
        layer.weight_scale = frozen_parameter(layer.weight_scale.data.reshape(1, -1).contiguous())
        offset = layer.weight_offset.data.reshape(1, -1).contiguous()
        layer.weight_offset = frozen_parameter(offset)
        layer.has_weight_offset = bool(offset.abs().max() > 0)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        shape = x.shape
        offset = layer.weight_offset if layer.has_weight_offset else None
        y = w8a8_dynamic_matmul(x.reshape(-1, shape[-1]), layer.weight, layer.weight_scale, offset)
        if bias is not None:
            y = y + bias
        out: torch.Tensor = y.reshape(*shape[:-1], -1)
        return out


def w8a8_dynamic_matmul(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8_DYNAMIC GEMM of x [m, k] with int8 weights `weight_t` [k, n] (scale, offset [1, n]):
    x quantized per token to int8, an exact int8 GEMM, then both scales, in x's dtype."""
    x_q, token_scale = quantize_per_token(x)
    acc = int8_matmul(x_q, weight_t).float()
    if weight_offset is not None:  # (w - o): subtract o * rowsum(x_q)
        acc = acc - x_q.float().sum(dim=-1, keepdim=True) * weight_offset
    return (acc * token_scale * weight_scale).to(x.dtype)


@register_weight_loader_v2_supported_method
class GcuW8A8StaticLinearMethod(_ModelslimLinearMethod):
    """W8A8 (static): per-tensor asymmetric activations; y = (x_q @ Wqᵀ + quant_bias) × deq_scale.

    quant_bias already holds the float bias (DESIGN.md 4.1), so the layer's bias is not added
    again. Fused layers keep one input scale per part (equal in practice: same input)."""

    quant_type = "W8A8"

    def create_weights(  # type: ignore[no-untyped-def]
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        self._weight(layer, n, k, loader, extra_weight_attrs)
        self._weight_scales(layer, n, k, loader, per_group=False)
        parts = len(output_partition_sizes)
        for name in ("input_scale", "input_offset"):
            layer.register_parameter(
                name,
                PerTensorScaleParameter(
                    data=torch.empty(parts, dtype=torch.float32), weight_loader=loader
                ),
            )
        for name, dtype in (("deq_scale", torch.float32), ("quant_bias", torch.int32)):
            layer.register_parameter(
                name,
                ChannelQuantScaleParameter(
                    data=torch.empty(n, dtype=dtype), output_dim=0, weight_loader=loader
                ),
            )
        layer.gcu_part_sizes = list(output_partition_sizes)

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        layer.weight = frozen_parameter(layer.weight.data.t())
        layer.deq_scale = frozen_parameter(layer.deq_scale.data.reshape(1, -1).contiguous())
        layer.quant_bias = frozen_parameter(layer.quant_bias.data.reshape(1, -1).contiguous())
        scales, offsets = layer.input_scale.data, layer.input_offset.data
        layer.input_scale = frozen_parameter(scales.clone())
        layer.input_offset = frozen_parameter(offsets.clone())
        layer.gcu_shared_input = bool(
            torch.all(scales == scales[0]) and torch.all(offsets == offsets[0])
        )

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if layer.gcu_shared_input:
            x_q = quantize_per_tensor(x2, layer.input_scale[0], layer.input_offset[0])
            acc = int8_matmul(x_q, layer.weight)
        else:
            pieces, start = [], 0
            for index, size in enumerate(layer.gcu_part_sizes):
                x_q = quantize_per_tensor(x2, layer.input_scale[index], layer.input_offset[index])
                pieces.append(int8_matmul(x_q, layer.weight[:, start : start + size]))
                start += size
            acc = torch.cat(pieces, dim=-1)
        y = ((acc + layer.quant_bias).float() * layer.deq_scale).to(x.dtype)
        out: torch.Tensor = y.reshape(*shape[:-1], -1)
        return out


def linear_method(quant_type: str, group_size: int, prefix: str) -> LinearMethodBase:
    """The linear method of one modelslim weight type (FLOAT -> vLLM's own unquantized one)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    if quant_type == "FLOAT":
        return UnquantizedLinearMethod()
    if quant_type == "W8A8_DYNAMIC":
        return GcuW8A8DynamicLinearMethod(group_size, prefix)
    if quant_type == "W8A8":
        return GcuW8A8StaticLinearMethod(group_size, prefix)
    if quant_type in ("W8A16", "W4A16"):
        return GcuWeightOnlyLinearMethod(quant_type, group_size, prefix)
    raise DescriptionError(f"gcu quantization: unknown weight type '{quant_type}' for '{prefix}'")


@register_weight_loader_v2_supported_method
class GcuKVCacheScalesMethod(LinearMethodBase):
    """Wraps the k/v (or fused qkv) projection's method to accept the C8 KV-cache tensors.

    vLLM routes `<attn>.k_proj.kv_cache_scale` to the fused qkv_proj, whose loader needs a
    parameter of that name; the values are kept on the layer (`kv_cache_scale`, one per output
    channel of k and v) and used by nothing: only vllm-ascend's C8 attention reads them."""

    def __init__(self, inner: LinearMethodBase):
        self.inner = inner

    def create_weights(  # type: ignore[no-untyped-def]
        self,
        layer,
        input_size_per_partition,
        output_partition_sizes,
        input_size,
        output_size,
        params_dtype,
        **extra_weight_attrs,
    ):
        self.inner.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        n = sum(output_partition_sizes)
        for name in ("kv_cache_scale", "kv_cache_offset"):
            layer.register_parameter(
                name,
                ChannelQuantScaleParameter(
                    data=torch.zeros(n, dtype=torch.float32),
                    output_dim=0,
                    weight_loader=extra_weight_attrs["weight_loader"],
                ),
            )

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        self.inner.process_weights_after_loading(layer)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.inner.apply(layer, x, bias)
