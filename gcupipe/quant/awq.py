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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field

from gcupipe.quant.folding import fold_scale
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
        description="As GPTQ's; off by default for AWQ (one more forward per layer for it).",
    )


class AWQOptions(MethodOptions):
    """Tuning knobs of AWQ (recipe `options:` keys of the same names)."""

    grid: int = Field(
        default=20, ge=1, description="Ratios alpha = 0, 1/grid, ..., (grid-1)/grid are tried."
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
) -> tuple[torch.Tensor, float, float]:
    """The AWQ factor s [k] for readers whose weights are stacked in `weight` [N, k].

    The ratios are tried coarse to fine: every `stride`-th (stride ≈ √grid), then those between
    the best of them and its coarse neighbours. On SmolLM2 (w4 g64 asym, 90 groups) that kept
    the ratio trying all 20 keeps in every group, with 11 error evaluations instead of 20.

    Returns (s, α, error / identity error); s is all ones when no ratio beats plain RTN."""
    import torch

    n, k = weight.shape
    group = spec.group_size or k
    w = weight.float()
    w_abs = w.abs().reshape(n, k // group, group)
    w_rel = (w_abs / w_abs.amax(dim=-1, keepdim=True).clamp(min=1e-8)).reshape(n, k)
    w_mean = w_rel.mean(dim=0).clamp(min=1e-8)
    x_mean = act_mean.float().clamp(min=1e-8)

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


@dataclass
class _Group:
    producer: str
    readers: list[str]  # quantized readers (their calibration inputs were captured)
    passive: list[str] = field(default_factory=list)  # float readers (router): weight x s only


def scaling_groups(view: LayerView, calib: LayerCalibration) -> list[_Group]:
    """The layer's AWQ groups, in forward order: the arch map's (norm, reader patterns) groups,
    then linear chains (up→down, v→o) whose shapes line up. Every module a norm group's
    patterns match is a reader: the calibrated ones are searched and quantized, the others
    (a float MoE router, ignored linears) only take the factor so the float model is unchanged."""
    modules = dict(view.module.named_modules())
    groups = []
    for producer, patterns in view.smooth_groups:
        matching = [
            name
            for name, mod in modules.items()
            if name and any(re.fullmatch(p, name) for p in patterns) and hasattr(mod, "weight")
        ]
        readers = [name for name in matching if name in calib.inputs]
        if producer in modules and readers:
            passive = [name for name in matching if name not in calib.inputs]
            groups.append(_Group(producer, readers, passive))
    for name in calib.inputs:
        for producer_pattern, reader_template in LINEAR_CHAINS:
            match = re.fullmatch(producer_pattern, name)
            reader = match.expand(reader_template) if match else None
            if reader is None or reader not in calib.inputs:
                continue
            if modules[name].weight.shape[0] == modules[reader].weight.shape[1]:
                groups.append(_Group(name, [reader]))
    return sorted(groups, key=lambda g: _forward_position(g.readers[0]))


def _forward_position(reader: str) -> tuple[int, int]:
    """Attention before MLP; inside each, the input projections before the output one (the
    order AWQ searches in: a later group sees the factors already folded by an earlier one)."""
    return (0 if "attn" in reader else 1, 1 if re.search(r"(o|down)_proj$", reader) else 0)


class AWQMethod(QuantMethod):
    """`method: awq`: W4A16 with activation-aware scales folded into the preceding ops.

    The scale search needs the layer's bits and group size, which arrive with the first
    `quantize_layer` call of a layer; it runs then, for the whole layer, before any linear of it
    is quantized, and every linear is then read back from the (scaled) module."""

    name = "awq"
    summary = "int4 weights in groups of 64 with activation-aware scales, float activations"
    bits = 4
    group_size = 64
    needs_calibration = True
    Options = AWQOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        assert isinstance(self.options, AWQOptions)
        self.awq_options: AWQOptions = self.options
        self._view: LayerView | None = None
        self._calib: LayerCalibration | None = None
        self._searched = False
        self._scales: dict[str, torch.Tensor] = {}  # reader (in-layer name) -> s [k]
        self._ratios: dict[str, float] = {}
        self._cache: tuple[Any, Any, torch.Tensor] | None = None
        # GPTQ's statistics of the current layer's inputs, shared by the search and the GPTQ
        # stacks; cleared once the layer is quantized (they keep the inputs alive)
        self._statistics = StatisticsByInput(self.device)
        gptq = self.awq_options.gptq
        self._gptq = None if gptq is None else GPTQMethod(gptq, self.device)

    @property
    def float_targets(self) -> bool:
        return self._gptq is not None and self._gptq.float_targets

    def float_targets_for(self, tokens: int, in_features: int) -> bool:
        return self._gptq is not None and self._gptq.float_targets_for(tokens, in_features)

    def prepare_layer(self, view: LayerView, calib: LayerCalibration) -> None:
        self._view, self._calib = view, calib
        self._searched = False
        self._scales, self._ratios, self._cache = {}, {}, None
        self._statistics.clear()

    def _search_once(self, spec: LayerSpec) -> None:
        """Search and fold the scales of the current layer before its first linear is quantized
        (the search needs the layer's bits and group size, which come with its specs)."""
        if spec.activation is not ActivationScheme.NONE:
            raise ValueError("AWQ quantizes weights only (W4A16): activations stay float")
        if not self._searched and self._view is not None:
            self._search_layer(spec)
            self._searched = True

    def _search_layer(self, spec: LayerSpec) -> None:
        """Search and fold the scales of every group of the current layer."""
        import torch

        assert self._view is not None and self._calib is not None
        options, module = self.awq_options, self._view.module
        for group in scaling_groups(self._view, self._calib):
            # statistics from the reader that saw the most tokens (not a routed expert)
            inputs = max((self._calib.inputs[r] for r in group.readers), key=len)
            if fallback_reason(inputs, options.min_tokens) is not None:
                continue
            x = inputs.reshape(-1, inputs.shape[-1])
            act_mean = x.abs().float().mean(dim=0).to(self.device)
            hessian = self._search_hessian(inputs)
            readers = [module.get_submodule(r) for r in group.readers]
            stacked = torch.cat([r.weight.detach().float() for r in readers]).to(self.device)
            scale, ratio, _relative = search_scale(stacked, act_mean, hessian, spec, options.grid)
            for reader in group.readers:
                self._ratios[reader] = ratio
            if ratio < 0:
                continue  # plain RTN was best: leave the weights alone
            scale = scale.cpu()
            producer = module.get_submodule(group.producer)
            fold_scale(
                producer, [module.get_submodule(n) for n in group.readers + group.passive], scale
            )
            for name in group.readers + group.passive:
                self._scales[name] = scale

    def _search_hessian(self, inputs: torch.Tensor) -> torch.Tensor:
        """XᵀX/N for the scale search. With GPTQ rounding: half GPTQ's H of the same statistics
        (multiplied once for both, products in the inputs' dtype), in the inputs' dtype; with RTN
        rounding: of at most max_search_tokens rows, in fp32."""
        if self._gptq is None:
            return second_moment(inputs, self.device, self.awq_options.max_search_tokens)
        return (self._statistics.of(inputs).hessian() / 2).to(inputs.dtype)

    def _relative(self, name: str) -> str | None:
        """The in-layer name of a full module name of the current layer, if it is one."""
        if self._calib is None:
            return None
        matches = [r for r in self._calib.inputs if name == r or name.endswith("." + r)]
        return max(matches, key=len) if matches else None

    def _hessian(self, inputs: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """H of the linear's (scaled) inputs; q/k/v share one and it is computed once."""
        if self._cache is None or self._cache[0] is not inputs or self._cache[1] is not scale:
            options = self.awq_options
            hessian = second_moment(inputs, self.device, options.max_search_tokens)
            if scale is not None:
                s = scale.to(hessian.device)
                hessian = hessian / (s[:, None] * s[None, :])
            self._cache = (inputs, scale, hessian)
        return self._cache[2]

    def quantize_linears(self, jobs: list[LinearJob]) -> Iterator[tuple[str, QuantizedLinear]]:
        if self._gptq is None or not jobs:
            for job in jobs:
                yield (
                    job.module,
                    self.quantize_layer(job.name, job.weight(), job.bias(), job.inputs, job.spec),
                )
            return
        # GPTQ on the scaled weights (the modules hold them once searched), from the statistics
        # of the scaled inputs x / s (S⁻¹ H S⁻¹, from the products the search read): readers of
        # one input share one s, so GPTQ stacks them as it stacks q/k/v
        for job in jobs:
            if job.inputs is not None:
                self._statistics.of(job.inputs, job.float_inputs)
        for job in jobs:
            self._search_once(job.spec)
        scaled: dict[tuple[int, int], InputStatistics] = {}

        def statistics(job: LinearJob) -> InputStatistics | None:
            if job.inputs is None:
                return None
            stats, s = self._statistics.of(job.inputs), self._scales.get(job.module)
            if s is None:
                return stats
            key = (id(job.inputs), id(s))
            if key not in scaled:
                scaled[key] = stats.scaled(s)
            return scaled[key]

        gptq_jobs = []
        for job in jobs:
            reason = fallback_reason(job.inputs, self.awq_options.min_tokens)
            if reason is not None:
                layer = rtn_fallback(job.weight(), job.bias(), job.spec, self.name, reason)
                yield job.module, layer
                continue
            gptq_jobs.append(job)
        for module, layer in self._gptq.quantize_linears(gptq_jobs, statistics):
            layer.method = self.name
            layer.extra["awq_ratio"] = self._ratios.get(module)
            layer.extra["awq_scaled"] = module in self._scales
            yield module, layer
        self._statistics.clear()

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        options = self.awq_options
        self._search_once(spec)
        rel = self._relative(name)
        if rel is not None and self._view is not None:  # the module holds the scaled weights
            linear = self._view.module.get_submodule(rel)
            weight = linear.weight.detach().float().clone()
            bias = None if linear.bias is None else linear.bias.detach().float().clone()
        reason = fallback_reason(inputs, options.min_tokens)
        if reason is not None:
            return rtn_fallback(weight, bias, spec, self.name, reason)
        assert inputs is not None
        scale_factor = self._scales.get(rel) if rel is not None else None
        extra = {
            "awq_ratio": self._ratios.get(rel or "", None),
            "awq_scaled": scale_factor is not None,
        }
        if self._gptq is not None:  # a linear quantized on its own: a stack of one
            stats = self._statistics.of(inputs)
            if scale_factor is not None:
                stats = stats.scaled(scale_factor)
            layer = self._gptq.quantize_stacked([weight], [bias], stats, spec)[0]
            layer.method = self.name
            layer.extra.update(extra)
            return layer
        if any(re.fullmatch(p, name) for p in options.clip_skip):
            w_scale, w_offset = weight_qparams(weight, spec.bits, spec.group_size, spec.symmetric)
        else:
            hessian = self._hessian(inputs, scale_factor)
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
            extra={
                **extra,
                "calibration_tokens": int(inputs.reshape(-1, inputs.shape[-1]).shape[0]),
            },
        )
