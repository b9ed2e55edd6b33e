"""vLLM linear methods for the modelslim types, on vLLM's own kernels where the platform has one.

At `process_weights_after_loading` each method turns the modelslim tensors into what vLLM's
kernel-choice helpers take (`init_int8_linear_kernel` for W8A8_DYNAMIC and static W8A8, the
scaled-int8 GEMM compressed-tensors W8A8 uses: oneDNN on CPU, cutlass on CUDA;
`choose_mp_linear_kernel` for W4A16/W8A16, in the GPTQ layout) and calls it. Where no kernel
takes a layer (asymmetric W8A8_DYNAMIC weights, fused parts with different static input scales,
a weight-only type or shape the platform has no kernel for) the layer runs the same integer math
in plain torch (torch._int_mm, or weights dequantized once at load), and the log says so once.
"""

from __future__ import annotations

import os

import torch
from torch.nn import Parameter
from vllm.logger import init_logger
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

logger = init_logger(__name__)


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
    """W8A16 / W4A16 on vLLM's weight-only kernel for the platform (`choose_mp_linear_kernel`:
    on CPU its WNA16 GEMM for 4 bits, on CUDA Marlin/Machete), given the GPTQ layout it reads.

    Where no kernel takes the layer, (q - offset) * scale in fp32, cast to the activation dtype,
    float matmul: by default dequantized once at load (what a weight-only kernel computes on
    the fly, so the results are identical); see LOW_MEMORY_ENV."""

    def __init__(self, quant_type: str, group_size: int, prefix: str):
        super().__init__(group_size, prefix)
        self.quant_type = quant_type
        self.low_memory = os.environ.get(LOW_MEMORY_ENV, "0") not in ("", "0", "false")
        self.kernel = None

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
        self.kernel = self._weight_only_kernel(layer, weight)
        if self.kernel is not None:
            return
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

    def _weight_only_kernel(self, layer, weight: torch.Tensor):  # type: ignore[no-untyped-def]
        """vLLM's weight-only kernel for this layer, its tensors put in the GPTQ layout it reads
        (unsigned values packed into int32 along k, scales [groups, n], zero points packed along
        n), or None (logged once) where the platform has none."""
        from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            pack_quantized_values_into_int32,
        )
        from vllm.scalar_type import scalar_types

        unusable = cpu_kernels_unusable()
        if unusable:
            _portable(unusable)
            return None
        if layer.gcu_params_dtype not in (torch.bfloat16, torch.float16):
            # vLLM's weight-only GEMMs (CPU WNA16, Marlin, Machete) take 16-bit activations
            _portable(f"{self.quant_type} in {layer.gcu_params_dtype} (no 16-bit activations)")
            return None
        n, k = weight.shape
        bits = 4 if self.quant_type == "W4A16" else 8
        half = 1 << (bits - 1)  # signed -> unsigned: GPTQ stores q + 2**(bits-1)
        offsets = layer.weight_offset.data
        zero_points = bool(offsets.abs().max() > 0)
        types = {
            (4, False): scalar_types.uint4b8,
            (8, False): scalar_types.uint8b128,
            (4, True): scalar_types.uint4,
            (8, True): scalar_types.uint8,
        }
        config = MPLinearLayerConfig(
            full_weight_shape=(layer.input_size, layer.output_size),
            partition_weight_shape=(k, n),
            weight_type=types[(bits, zero_points)],
            act_type=layer.gcu_params_dtype,
            group_size=self.group_size or -1,
            zero_points=zero_points,
        )
        try:
            kernel_type = choose_mp_linear_kernel(config)
        except ValueError as exc:
            reasons = " ".join(str(exc).split())
            _portable(f"no weight-only kernel for {self.quant_type} here ({reasons})")
            return None
        logger.info_once("gcu quantization: %s on %s", self.quant_type, kernel_type.__name__)
        unsigned = weight.to(torch.int32).t() + half  # [k, n]
        packed = pack_quantized_values_into_int32(unsigned, config.weight_type, packed_dim=0)
        del layer.weight, layer.weight_offset
        layer.weight_packed = _gptq_parameter(packed, packed_dim=0)
        scales = layer.weight_scale.data.t().to(layer.gcu_params_dtype)
        layer.weight_scale = _gptq_parameter(scales)
        if zero_points:
            zeros = (offsets.round().to(torch.int32) + half).t()  # [groups, n]
            packed_zeros = pack_quantized_values_into_int32(zeros, config.weight_type, 1)
            layer.weight_zero_point = _gptq_parameter(packed_zeros, packed_dim=1)
        kernel = kernel_type(
            config,
            w_q_param_name="weight_packed",
            w_s_param_name="weight_scale",
            w_zp_param_name="weight_zero_point" if zero_points else None,
        )
        kernel.process_weights_after_loading(layer)
        return kernel

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if self.kernel is not None:
            return _on_kernel(self.kernel, layer, x, bias)
        if layer.gcu_dequantized:
            return self.float_method.apply(layer, x, bias)
        weight = ((layer.weight.float() - layer.weight_offset) * layer.weight_scale).to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)


def _gptq_parameter(data: torch.Tensor, packed_dim: int | None = None) -> Parameter:
    """A tensor in the GPTQ layout ([k or groups, n]: input dim 0, output dim 1) with the
    attributes vLLM's weight-only kernels read off their parameters."""
    param = frozen_parameter(data.contiguous())
    param.input_dim, param.output_dim = 0, 1  # type: ignore[attr-defined]
    if packed_dim is not None:
        param.packed_dim = packed_dim  # type: ignore[attr-defined]
    return param


def _int8_kernel(layer, static: bool, symmetric: bool, module: str):  # type: ignore[no-untyped-def]
    """vLLM's scaled-int8 GEMM for `layer`, which holds what it reads: int8 `weight` [n, k],
    `weight_scale` [n, 1], `input_scale` / `input_zero_point` (static) or None, `azp_adj`.
    Its weights are prepacked at once; `weight` is left as an empty placeholder (vLLM's MLA
    reads `layer.weight.device` when it dequantizes kv_b_proj through `apply`)."""
    from vllm.model_executor.kernels.linear import init_int8_linear_kernel

    kernel = init_int8_linear_kernel(
        is_channelwise=True,
        is_static_input_scheme=static,
        input_symmetric=symmetric,
        module_name=module,
    )
    kernel.process_weights_after_loading(layer)
    if getattr(layer, "weight", None) is None:
        layer.weight = frozen_parameter(torch.empty(0, dtype=torch.int8))
    return kernel


def _on_kernel(kernel, layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The kernel's GEMM in the model's dtype, which its prepacked weights and output are set
    up for; an input in another dtype (vLLM's MLA passes an fp32 identity through `apply` to
    read kv_b_proj's weights back) is cast in and the output back."""
    dtype = layer.gcu_params_dtype
    if x.dtype == dtype:
        out: torch.Tensor = kernel.apply_weights(layer, x, bias)
        return out
    bias = None if bias is None else bias.to(dtype)
    return kernel.apply_weights(layer, x.to(dtype), bias).to(x.dtype)  # type: ignore[no-any-return]


def cpu_kernels_unusable() -> str | None:
    """Why vLLM's quantized CPU GEMMs must not be used on this machine, or None.

    vLLM's CPU wheel ships an AVX-512 and an AVX2 build of its ops. The AVX2 one (loaded on a
    CPU without AVX-512) has no `cpu_gemm_wna16`, so its weight-only kernel fails at the first
    call, and its int8 scaled GEMM was measured 16% (of the largest output) away from the exact
    integer result on an AMD EPYC with AVX2 only, where the AVX-512 build is within bf16
    rounding (tests/vllm_plugin/test_linear.py)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return None
    return f"vLLM's CPU ops for {capability} have no exact quantized GEMMs"


def _portable(reason: str) -> None:
    logger.info_once("gcu quantization: %s; those layers run in plain torch", reason)


@register_weight_loader_v2_supported_method
class GcuW8A8DynamicLinearMethod(_ModelslimLinearMethod):
    """W8A8_DYNAMIC: int8 weights per channel, symmetric int8 per-token activations at run time,
    on vLLM's scaled-int8 GEMM; asymmetric weights (a weight offset, which that GEMM does not
    take) in plain torch."""

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
        layer.logical_widths = list(output_partition_sizes)
        layer.gcu_params_dtype = params_dtype
        self.kernel = None

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        offset = layer.weight_offset.data.reshape(1, -1).contiguous()
        unusable = cpu_kernels_unusable()
        if unusable or bool(offset.abs().max() > 0):
            _portable(unusable or "W8A8_DYNAMIC weights with a weight offset (asymmetric)")
            layer.weight = frozen_parameter(layer.weight.data.t())  # [k, n] for int8_matmul
            layer.weight_scale = frozen_parameter(layer.weight_scale.data.reshape(1, -1))
            layer.weight_offset = frozen_parameter(offset)
            return
        del layer.weight_offset
        layer.weight_scale = frozen_parameter(layer.weight_scale.data.reshape(-1, 1).contiguous())
        for name in ("input_scale", "input_zero_point", "azp_adj"):
            layer.register_parameter(name, None)
        self.kernel = _int8_kernel(layer, False, True, type(self).__name__)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if self.kernel is not None:
            return _on_kernel(self.kernel, layer, x, bias)
        shape = x.shape
        y = w8a8_dynamic_matmul(
            x.reshape(-1, shape[-1]), layer.weight, layer.weight_scale, layer.weight_offset
        )
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

    On vLLM's scaled-int8 GEMM (static, asymmetric: y = s_x s_w (x_q - z) Wqᵀ + b) as the same
    sum: s_w = deq_scale / s_x and b = deq_scale (quant_bias + z rowsum(Wq)). quant_bias already
    holds the float bias (DESIGN.md 4.1), so the layer's bias is not added again. Fused layers
    keep one input scale per part; parts with different ones (that GEMM takes one) run in plain
    torch."""

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
        layer.logical_widths = list(output_partition_sizes)
        layer.gcu_params_dtype = params_dtype
        self.kernel = None

    def process_weights_after_loading(self, layer) -> None:  # type: ignore[no-untyped-def]
        scales, offsets = layer.input_scale.data.clone(), layer.input_offset.data.clone()
        deq_scale = layer.deq_scale.data.reshape(1, -1).contiguous()
        quant_bias = layer.quant_bias.data.reshape(1, -1).contiguous()
        unusable = cpu_kernels_unusable()
        if unusable or not (torch.all(scales == scales[0]) and torch.all(offsets == offsets[0])):
            _portable(unusable or "fused W8A8 layers whose parts have different input scales")
            layer.weight = frozen_parameter(layer.weight.data.t())  # [k, n] for int8_matmul
            layer.deq_scale = frozen_parameter(deq_scale)
            layer.quant_bias = frozen_parameter(quant_bias)
            layer.input_scale = frozen_parameter(scales)
            layer.input_offset = frozen_parameter(offsets)
            return
        zero = offsets[0].round().to(torch.int32)
        # in float64: quant_bias and z * rowsum(Wq) are integers beyond float32's 2**24
        row_sums = layer.weight.data.to(torch.float64).sum(dim=1)
        bias = deq_scale[0].double() * (quant_bias[0].double() + zero.double() * row_sums)
        layer.gcu_bias = frozen_parameter(bias.to(layer.gcu_params_dtype))
        layer.weight_scale = frozen_parameter((deq_scale[0] / scales[0]).reshape(-1, 1))
        layer.input_scale = frozen_parameter(scales[:1])
        layer.register_parameter("input_zero_point", frozen_parameter(zero.reshape(1)))
        layer.register_parameter("azp_adj", None)
        for name in ("input_offset", "deq_scale", "quant_bias", "weight_offset"):
            delattr(layer, name)
        symmetric = bool(zero == 0)
        if symmetric:
            layer.input_zero_point = None
        self.kernel = _int8_kernel(layer, True, symmetric, type(self).__name__)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        if self.kernel is not None:
            return _on_kernel(self.kernel, layer, x, layer.gcu_bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
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
