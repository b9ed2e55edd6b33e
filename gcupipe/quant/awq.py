"""AWQ (Lin et al., 2023): protect the weights that meet large activations by per-channel scaling.

For each group of linears that read one input (q/k/v after input_layernorm, gate/up after
post_attention_layernorm, down_proj after up_proj, o_proj after v_proj when the shapes match),
a per-input-channel factor s is searched on a grid of ratios α:

    s = mean|x|^α / mean_w^(1-α), normalised so that sqrt(max(s) · min(s)) = 1,

where mean_w is the mean over output rows of |w| divided by its group's max |w|. The readers'
weights are multiplied by s and the producer (norm weight, or the rows of the previous linear)
divided by s, so the float model is unchanged while rounding error moves away from the salient
channels. The α kept (identity included, so AWQ never loses to RTN on its own objective) is the
one that minimises the group's output error ‖X Wᵀ − X Q(W·s)ᵀ/s‖², computed from H = XᵀX/N
as Σ (ΔW H) ⊙ ΔW, so every grid point costs one matmul instead of a forward pass; the grid is
searched coarse to fine (`search_scale`). With GPTQ rounding, H is GPTQ's (the same products).

The scaled weights are then rounded by GPTQ (quant/gptq.py, its defaults or `options.gptq`) on
the inputs the scaled readers see, x / s. SmolLM2 w4 g64 asym, 16,384 eval tokens: GPTQ rounding
38.41 against 40.63 for the other rounding (`gptq: null`): a clipping search that shrinks each
group's weight range (factors 1 … 0.5) where that lowers the group's own output error
(ΔW_g H_gg ΔW_gᵀ, all groups and rows at once), skipping q/k by default (their error is
amplified by the q·k product), then round-to-nearest in groups of 64.

MoE experts that saw fewer than `min_tokens` calibration tokens are quantized by RTN and marked
(`extra["fallback"] = "rtn"`): the stage report lists them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import Field

from gcupipe.quant.gptq import (
    GPTQMethod,
    GPTQOptions,
    InputStatistics,
    StatisticsByInput,
    fallback_reason,
    hessian_of,
    rtn_fallback,
)
from gcupipe.quant.intmath import qrange
from gcupipe.quant.methods import (
    LayerCalibration,
    LayerSpec,
    LayerView,
    LinearJob,
    MethodOptions,
    QuantMethod,
    ScalingGroup,
)
from gcupipe.quant.observers import quantize, scale_offset_from_range
from gcupipe.quant.rtn import quantize_weight, weight_qparams
from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear

if TYPE_CHECKING:
    import torch

# (producer, reader) pairs of linears, beyond the arch map's norm groups: the producer's output
# rows feed only this reader (through an elementwise product or attention weights), so dividing
# them by s is exact. `\g<p>` keeps the prefix (mlp., mlp.shared_experts., mlp.experts.3.).
LINEAR_CHAINS = (
    (r"(?P<p>.*)up_proj", r"\g<p>down_proj"),
    (r"(?P<p>self_attn\.)v_proj", r"\g<p>o_proj"),
)


class AWQRoundingOptions(GPTQOptions):
    """GPTQ's options for rounding AWQ's scaled weights: GPTQ's defaults, but no asymmetric
    calibration unless asked for. With it AWQ would be GPTQ's default plus a scale search, never
    as fast; without it AWQ is faster and still closer to float (SmolLM2 w4 g64 asym, full eval
    text, AVX-512 BF16, one run: 39.63 in 60 s without, 39.34 in 89 s with; GPTQ's default 39.95
    in 77 s; benchmarks/results/w4a16_accuracy.md)."""

    asymmetric_calibration: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="As GPTQ's; off by default for AWQ (the float model's forward and the "
        "float targets cost more than the scale search).",
    )


class AWQOptions(MethodOptions):
    """Tuning knobs of AWQ (recipe `options:` keys of the same names)."""

    grid: int = Field(
        default=20, ge=1, description="Ratios alpha = 0, 1/grid, ..., (grid-1)/grid are tried."
    )
    search_rows: int = Field(
        default=512,
        ge=0,
        description="Rows of the readers' stacked weights whose output error ranks the ratios "
        "(every n/search_rows-th; 0: all): the factor is one for all rows.",
    )
    clip_grid: int = Field(
        default=20,
        ge=1,
        description="RTN rounding (gptq: null): clipping factors tried between 1 and "
        "1 - clip_max_shrink.",
    )
    clip_max_shrink: float = Field(
        default=0.5, ge=0, lt=1, description="Largest range shrink of the clip search."
    )
    clip_skip: tuple[str, ...] = Field(
        default=(r".*\.(q|k)_proj", r".*\.q_(a|b)_proj"),
        description="Regexes (full module name) of layers whose ranges are not clipped.",
    )
    min_tokens: int = Field(
        default=32,
        ge=0,
        description="Fewer calibration tokens (a rarely routed expert): RTN instead.",
    )
    max_search_tokens: int = Field(
        default=16384,
        gt=0,
        description="RTN rounding (gptq: null): rows of X used for the search's H (a random "
        "subset beyond that). With GPTQ rounding the search reads GPTQ's H of every row.",
    )
    gptq: AWQRoundingOptions | None = Field(
        default_factory=AWQRoundingOptions,
        description="Round the scaled weights with GPTQ and these options; null: RTN with the "
        "clip search instead.",
    )


def second_moment(inputs: torch.Tensor, device: str, max_tokens: int = 0) -> torch.Tensor:
    """H = XᵀX / N in fp32 (a fixed random subset of rows when there are more than max_tokens)."""
    import torch

    x = inputs.reshape(-1, inputs.shape[-1])
    if max_tokens and x.shape[0] > max_tokens:
        generator = torch.Generator().manual_seed(0)
        x = x[torch.randperm(x.shape[0], generator=generator)[:max_tokens]]
    return hessian_of(x.float(), device) / 2  # GPTQ's H = 2XᵀX/N, multiplied using symmetry


def fake_quantize(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> torch.Tensor:
    """RTN quantize-dequantize of a weight [n, k] with min-max group ranges: the arithmetic of
    `weight_qparams` and `quantize_weight`, on the [n, groups, g] view (the search calls it for
    every ratio, and per-feature copies of the scales cost more than the rounding)."""
    import torch

    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size if group_size else 1, group_size or k)
    scale, offset = scale_offset_from_range(w.amin(dim=-1), w.amax(dim=-1), bits, symmetric)
    scale, offset = scale.unsqueeze(-1), offset.unsqueeze(-1)
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(w / scale + offset), qmin, qmax)
    return ((q - offset) * scale).reshape(n, k)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖X Δᵀ‖² / N = Σ (Δ H) ⊙ Δ for H = XᵀX / N, Δ H multiplied in H's dtype (bf16 where the
    calibration forwards run in bf16: its rounding is relative to Δ, the same for every ratio)."""
    return float(((delta.to(hessian.dtype) @ hessian).float() * delta).sum())


def search_scale(
    weight: torch.Tensor,
    act_mean: torch.Tensor,
    hessian: torch.Tensor,
    spec: LayerSpec,
    grid: int,
    rows: int = 0,
) -> tuple[torch.Tensor, float, float]:
    """The AWQ factor s [k] for readers whose weights are stacked in `weight` [N, k].

    The ratios are tried coarse to fine: every `stride`-th (stride ≈ √grid), then those between
    the best of them and its coarse neighbours. On SmolLM2 (w4 g64 asym, 90 groups) that kept
    the ratio trying all 20 keeps in every group, with 11 error evaluations instead of 20.
    `rows` > 0: the output error of every ⌈N / rows⌉-th row ranks the ratios (one matmul of
    that many rows by H per ratio), the factor being one for all rows.

    Returns (s, α, error / identity error); s is all ones when no ratio beats plain RTN."""
    import torch

    n, k = weight.shape
    group = spec.group_size or k
    w_abs = weight.float().abs().reshape(n, k // group, group)
    w_rel = (w_abs / w_abs.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(n, k)
    w_mean = w_rel.mean(dim=0).clamp(min=1e-8)
    x_mean = act_mean.float().clamp(min=1e-8)
    w = weight[:: max(1, math.ceil(n / rows)) if rows else 1].float()

    def tried_at(step: int) -> tuple[float, torch.Tensor]:
        ratio = step / grid
        s = (x_mean.pow(ratio) / w_mean.pow(1 - ratio)).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        quantized = fake_quantize(w * s, spec.bits, spec.group_size, spec.symmetric) / s
        return output_error(w - quantized, hessian), s

    stride = max(1, round(math.sqrt(grid)))
    tried = {step: tried_at(step) for step in range(0, grid, stride)}
    coarse = min(tried, key=lambda step: (tried[step][0], step))
    for step in range(max(0, coarse - stride + 1), min(grid, coarse + stride)):
        if step not in tried:
            tried[step] = tried_at(step)
    best = min(tried, key=lambda step: (tried[step][0], step))
    error, scale = tried[best]
    base = output_error(w - fake_quantize(w, spec.bits, spec.group_size, spec.symmetric), hessian)
    if error >= base:
        return torch.ones(k, device=w.device), -1.0, 1.0
    return scale, best / grid, error / max(base, 1e-30)


def clip_qparams(
    weight: torch.Tensor, hessian: torch.Tensor, spec: LayerSpec, options: AWQOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scale/offset [n, groups] with each (row, group) range shrunk by the factor that
    minimises that group's output error Δ_g H_gg Δ_gᵀ (factor 1 = plain min-max first)."""
    import torch

    n, k = weight.shape
    group = spec.group_size or k
    groups = k // group
    w = weight.float().reshape(n, groups, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # [n, G]
    blocks = torch.stack(
        [hessian[g * group : (g + 1) * group, g * group : (g + 1) * group] for g in range(groups)]
    )  # [G, g, g]
    best_error = torch.full((n, groups), float("inf"), device=w.device)
    best_scale = torch.zeros(n, groups, device=w.device)
    best_offset = torch.zeros(n, groups, device=w.device)
    steps = options.clip_grid if options.clip_max_shrink > 0 else 1
    for step in range(steps):
        factor = 1.0 - options.clip_max_shrink * step / max(options.clip_grid, 1)
        scale, offset = scale_offset_from_range(lo * factor, hi * factor, spec.bits, spec.symmetric)
        q = quantize(w, scale.unsqueeze(-1), offset.unsqueeze(-1), spec.bits).float()
        delta = w - (q - offset.unsqueeze(-1)) * scale.unsqueeze(-1)  # [n, G, g]
        error = torch.einsum("ngi,gij,ngj->ng", delta, blocks, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return best_scale, best_offset


def scaling_groups(view: LayerView, linears: list[str]) -> list[ScalingGroup]:
    """The layer's AWQ groups, in forward order: the arch map's (norm, reader patterns) groups,
    then linear chains (up→down, v→o) whose shapes line up. Every module a norm group's
    patterns match is a reader: the quantized ones (`linears`) are searched and quantized, the
    others (a float MoE router, ignored linears) only take the factor so the float model is
    unchanged."""
    modules = dict(view.module.named_modules())
    groups = []
    for producer, patterns in view.smooth_groups:
        matching = [
            name
            for name, mod in modules.items()
            if name and any(re.fullmatch(p, name) for p in patterns) and hasattr(mod, "weight")
        ]
        readers = [name for name in matching if name in linears]
        if producer in modules and readers:
            passive = [name for name in matching if name not in linears]
            groups.append(ScalingGroup(producer, readers, passive))
    for name in linears:
        for producer_pattern, reader_template in LINEAR_CHAINS:
            match = re.fullmatch(producer_pattern, name)
            reader = match.expand(reader_template) if match else None
            if reader is None or reader not in linears:
                continue
            if modules[name].weight.shape[0] == modules[reader].weight.shape[1]:
                groups.append(ScalingGroup(name, [reader]))
    return sorted(groups, key=lambda g: _forward_position(g.readers[0]))


def _forward_position(reader: str) -> tuple[int, int]:
    """Attention before MLP; inside each, the input projections before the output one."""
    return (0 if "attn" in reader else 1, 1 if re.search(r"(o|down)_proj$", reader) else 0)


class AWQMethod(QuantMethod):
    """`method: awq`: W4A16 with activation-aware scales folded into the preceding ops.

    Driven in the layer's one calibration forward (quant/methods.py): `group_scale` searches a
    group's factor when its input appears, and each linear is then rounded on the scaled input
    it receives."""

    name = "awq"
    summary = "int4 weights in groups of 64 with activation-aware scales, float activations"
    bits = 4
    group_size = 64
    needs_calibration = True
    in_forward = True
    Options = AWQOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.options, AWQOptions)
        self.awq_options: AWQOptions = self.options
        self._ratios: dict[str, float] = {}  # reader (in-layer name) -> α kept
        # GPTQ's statistics of the current layer's inputs, shared by the search and the GPTQ
        # stacks: those of a scaled group's readers are its unscaled input's, scaled by s
        self._statistics = StatisticsByInput(self.device)
        self._scaled: dict[str, InputStatistics] = {}
        self._cache: tuple[Any, torch.Tensor] | None = None  # RTN rounding: (inputs, H)
        gptq = self.awq_options.gptq
        self._gptq = None if gptq is None else GPTQMethod(gptq, self.device)

    def float_samples(self, samples: int, seq_len: int) -> int:
        return 0 if self._gptq is None else self._gptq.float_samples(samples, seq_len)

    def float_targets_for(self, tokens: int, in_features: int) -> bool:
        return self._gptq is not None and self._gptq.float_targets_for(tokens, in_features)

    def prepare_layer(self, view: LayerView, calib: LayerCalibration) -> None:
        self._ratios, self._scaled, self._cache = {}, {}, None
        self._statistics.clear()

    def scaling_groups(self, view: LayerView, linears: list[str]) -> list[ScalingGroup]:
        return scaling_groups(view, linears)

    def group_scale(
        self,
        group: ScalingGroup,
        inputs: torch.Tensor,
        float_inputs: torch.Tensor | None,
        weight: torch.Tensor,
        spec: LayerSpec,
    ) -> torch.Tensor | None:
        import torch

        if spec.activation is not ActivationScheme.NONE:
            raise ValueError("AWQ quantizes weights only (W4A16): activations stay float")
        if fallback_reason(inputs, self.awq_options.min_tokens) is not None:
            return None
        stats = self._statistics.of(inputs, float_inputs)
        act_mean = inputs.abs().mean(dim=0, dtype=torch.float32).to(self.device)
        if self._gptq is None:
            hessian = second_moment(inputs, self.device, self.awq_options.max_search_tokens)
        else:  # half GPTQ's H, multiplied once for the search and the rounding
            hessian = (stats.hessian() / 2).to(inputs.dtype)
        scale, ratio, _relative = search_scale(
            weight.to(self.device),
            act_mean,
            hessian,
            spec,
            self.awq_options.grid,
            self.awq_options.search_rows,
        )
        for reader in group.readers:
            self._ratios[reader] = ratio
        if ratio < 0:
            return None  # plain RTN was best: leave the weights alone
        scaled = stats.scaled(scale)  # one object for the group: GPTQ stacks its readers
        for reader in group.readers:
            self._scaled[reader] = scaled
        return scale.cpu()

    def quantize_linears(self, jobs: list[LinearJob]) -> Iterator[tuple[str, QuantizedLinear]]:
        gptq_jobs = []
        for job in jobs:
            reason = fallback_reason(job.inputs, self.awq_options.min_tokens)
            if self._gptq is None or reason is not None:
                layer = self.quantize_layer(
                    job.name, job.weight(), job.bias(), job.inputs, job.spec
                )
                yield job.module, self._marked(job.module, layer)
            else:
                gptq_jobs.append(job)
        if not gptq_jobs:
            return
        assert self._gptq is not None

        def statistics(job: LinearJob) -> InputStatistics | None:
            # a scaled group's readers: S⁻¹ H S⁻¹ from the products the search read
            assert job.inputs is not None  # (fallback_reason is None)
            scaled = self._scaled.get(job.module)
            return scaled or self._statistics.of(job.inputs, job.float_inputs)

        for module, layer in self._gptq.quantize_linears(gptq_jobs, statistics):
            layer.method = self.name
            yield module, self._marked(module, layer)

    def _marked(self, module: str, layer: QuantizedLinear) -> QuantizedLinear:
        layer.extra["awq_ratio"] = self._ratios.get(module)
        layer.extra["awq_scaled"] = self._ratios.get(module, -1.0) >= 0
        return layer

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        """One linear on the inputs it reads (already divided by its group's factor): GPTQ or
        RTN rounding with the clip search."""
        options = self.awq_options
        reason = fallback_reason(inputs, options.min_tokens)
        if reason is not None:
            return rtn_fallback(weight, bias, spec, self.name, reason)
        assert inputs is not None
        if self._gptq is not None:
            layer = self._gptq.quantize_stacked(
                [weight], [bias], InputStatistics(inputs, device=self.device), spec
            )[0]
            layer.method = self.name
            return layer
        if any(re.fullmatch(p, name) for p in options.clip_skip):
            w_scale, w_offset = weight_qparams(weight, spec.bits, spec.group_size, spec.symmetric)
        else:
            hessian = self._hessian(inputs)
            w_scale, w_offset = clip_qparams(weight.to(hessian.device), hessian, spec, options)
            w_scale, w_offset = w_scale.cpu(), w_offset.cpu()
        q = quantize_weight(weight, w_scale, w_offset, spec.bits, spec.group_size)
        return QuantizedLinear(
            weight=q,
            weight_scale=w_scale,
            weight_offset=w_offset,
            bits=spec.bits,
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            activation=ActivationScheme.NONE,
            bias=bias,
            method=self.name,
            extra={"calibration_tokens": int(inputs.reshape(-1, inputs.shape[-1]).shape[0])},
        )

    def _hessian(self, inputs: torch.Tensor) -> torch.Tensor:
        """XᵀX/N of a linear's inputs for the clip search; q/k/v share one, computed once."""
        if self._cache is None or self._cache[0] is not inputs:
            hessian = second_moment(inputs, self.device, self.awq_options.max_search_tokens)
            self._cache = (inputs, hessian)
        return self._cache[1]
