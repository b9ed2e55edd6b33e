"""GPTQ (Frantar et al., 2022): weight rounding that compensates each column's error with the rest.

For a linear y = x Wᵀ with calibration inputs X, GPTQ minimises ‖X Wᵀ − X Qᵀ‖² one input column
at a time: after rounding column j, its error is spread over the not-yet-rounded columns through
the inverse Hessian H⁻¹ (H = 2XᵀX/N). Written from the paper's algorithm:

- the Hessian is accumulated batch by batch (`HessianAccumulator`), so calibration never needs
  to be concatenated; columns never seen by the data (zero diagonal) are "dead": set to zero;
- dampening `damp_percent` × mean(diag H) keeps H invertible; ONE Cholesky factorisation per
  layer gives the upper Cholesky factor of H⁻¹, whose rows are all the algorithm needs;
- columns are processed in blocks (128): inside a block the error update is a rank-1 update of
  the block only, the rest of the matrix gets one matmul per block ("lazy batch" updates);
- group scales/offsets are computed when a group starts, from the already-updated weights (the
  block size is a multiple of the group size, so a group never straddles a block), optionally
  with a small clipping search weighted by diag(H);
- `act_order` processes columns by decreasing diag(H). It is only accepted with static groups
  (every group's scale/offset fixed from the original weights before the loop), so the written
  g_idx stays contiguous (i // g): the vLLM-GCU loader rejects shuffled g_idx.

The result is the shared `QuantizedLinear` (quant/scheme.py), so every format writer handles it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import Field

from gcupipe.errors import StageError
from gcupipe.quant.intmath import qrange
from gcupipe.quant.methods import (
    LayerCalibration,
    LayerSpec,
    LayerView,
    MethodOptions,
    QuantMethod,
)
from gcupipe.quant.observers import scale_offset_from_range
from gcupipe.quant.rtn import rtn_linear
from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear
from gcupipe.quant.threads import torch_threads

if TYPE_CHECKING:
    import torch

ACT_ORDER_NEEDS_STATIC_GROUPS = (
    "GPTQ act_order with group_size > 0 needs static_groups: true; with dynamic groups the "
    "columns of one group end up in different quantization groups (a shuffled g_idx), which "
    "the vLLM-GCU GPTQ loader rejects. Set static_groups: true or act_order: false"
)


class GPTQOptions(MethodOptions):
    """Tuning knobs of GPTQ (recipe `options:` keys of the same names)."""

    damp_percent: float = Field(
        default=0.01,
        ge=0,
        lt=1,
        description="Dampening added to diag(H), as a fraction of its mean.",
    )
    block_size: int = Field(default=128, gt=0, description="Columns per lazy-update block.")
    act_order: bool = Field(
        default=True, description="Process columns by decreasing Hessian diagonal."
    )
    static_groups: bool = Field(
        default=True,
        description="Fix every group's scale/offset before the loop (keeps g_idx contiguous).",
    )
    clip_search: bool = Field(
        default=True, description="Per-group range shrink minimising the diag(H)-weighted error."
    )
    clip_grid: int = Field(default=20, gt=0, description="Number of shrink factors tried.")
    clip_max_shrink: float = Field(
        default=0.25, ge=0, lt=1, description="Smallest range tried = (1 - this) x min-max range."
    )
    min_tokens: int = Field(
        default=32,
        ge=0,
        description="Fewer calibration tokens (a rarely routed expert): RTN instead.",
    )

    def check(self, group_size: int) -> list[str]:
        if self.act_order and group_size > 0 and not self.static_groups:
            return [ACT_ORDER_NEEDS_STATIC_GROUPS]
        return []


class HessianAccumulator:
    """Running H = 2/N Σ xᵀx over every calibration row seen, in fp32, batch by batch."""

    def __init__(self, in_features: int, device: str = "cpu", chunk_rows: int = 8192):
        import torch

        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0
        self.chunk_rows = chunk_rows

    def add(self, inputs: torch.Tensor) -> None:
        """Fold a batch [..., k] into the running mean (rescaling what was there)."""
        import torch

        x = inputs.reshape(-1, self.hessian.shape[0])
        for start in range(0, x.shape[0], self.chunk_rows):
            chunk = x[start : start + self.chunk_rows].to(self.hessian.device, torch.float32)
            total = self.rows + chunk.shape[0]
            self.hessian.mul_(self.rows / total)
            chunk = chunk * math.sqrt(2.0 / total)
            self.hessian.addmm_(chunk.t(), chunk)
            self.rows = total


def hessian_of(inputs: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """H = 2XᵀX/N of calibration inputs [tokens, k]."""
    acc = HessianAccumulator(int(inputs.shape[-1]), device)
    acc.add(inputs)
    return acc.hessian


def _range_qparams(
    lo: torch.Tensor,
    hi: torch.Tensor,
    weights: torch.Tensor,
    importance: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    options: GPTQOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/offset [n, 1] for rows of `weights` [n, g]: min-max, or the best shrunk range.

    The clipping search tries ranges (1 - f) x [min, max] and keeps, per row, the one whose
    rounding error Σ_j h_j (w_j - q_j)² is smallest (h = diag(H) of those columns): a shrunk
    range rounds the bulk of the weights more finely at the cost of clipping a few outliers."""
    import torch

    if not options.clip_search or options.clip_grid <= 1:
        return scale_offset_from_range(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits)
    shrink = torch.linspace(0.0, options.clip_max_shrink, options.clip_grid, device=lo.device)
    factors = 1.0 - shrink  # [s]; factor 1 (plain min-max) first, so ties keep it
    scale, offset = scale_offset_from_range(lo * factors, hi * factors, bits, symmetric)  # [n, s]
    w = weights.unsqueeze(1)  # [n, 1, g]
    q = torch.clamp(torch.round(w / scale.unsqueeze(-1) + offset.unsqueeze(-1)), qmin, qmax)
    error = ((q - offset.unsqueeze(-1)) * scale.unsqueeze(-1) - w).square_()
    if importance is not None:
        error = error * importance
    best = error.sum(dim=-1).argmin(dim=1, keepdim=True)  # [n, 1]
    return scale.gather(1, best), offset.gather(1, best)


def _cholesky_inverse_upper(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (λ = damp × mean diag), retrying with more
    dampening if H is not numerically positive definite (e.g. very few calibration tokens)."""
    import torch

    mean_diag = float(torch.mean(torch.diag(hessian)))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = max(damp_percent, 1e-6)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                result: torch.Tensor = upper
                return result
        damp *= 10
    raise ValueError("the GPTQ Hessian is not positive definite even with 10x more dampening")


@contextmanager
def sequential_cpu_ops(device: torch.device) -> Iterator[None]:
    """Run the column loop's many tiny ops on one CPU thread.

    Each op touches a few thousand numbers; splitting that over threads costs more than it
    saves, and on a busy machine the thread hand-offs made the loop 50x slower (measured: 9 s
    vs 0.17 s for a 576 x 576 layer on 2 shared cores)."""
    if device.type != "cpu":
        yield
        return
    with torch_threads(1):
        yield


@dataclass
class GPTQResult:
    """Integer weights and group parameters of one layer, in the shared conventions."""

    weight: torch.Tensor  # int8 [n, k]
    scale: torch.Tensor  # fp32 [n, groups]
    offset: torch.Tensor  # fp32 [n, groups]
    loss: float  # Σ (w - q)² / [H⁻¹]_jj / 2, the quantity GPTQ minimises greedily


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 64,
    symmetric: bool = True,
    options: GPTQOptions | None = None,
    device: str = "cpu",
) -> GPTQResult:
    """Quantize one weight [n, k] with GPTQ given its Hessian [k, k] on `device`; see the module
    docstring."""
    import torch

    options = options or GPTQOptions()
    problems = options.check(group_size)
    if problems:
        raise StageError(problems[0])
    with sequential_cpu_ops(torch.device(device)):
        return _gptq(weight, hessian, bits, group_size, symmetric, options, torch.device(device))


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    options: GPTQOptions,
    device: torch.device,
) -> GPTQResult:
    import torch

    w = weight.to(device, torch.float32).clone()
    h = hessian.to(device, torch.float32).clone()
    n, k = w.shape
    if group_size and k % group_size:
        raise ValueError(f"group size {group_size} does not divide input size {k}")
    group = group_size or k
    groups = k // group
    qmin, qmax = qrange(bits)

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    scale = torch.zeros(n, groups, device=device)
    offset = torch.zeros(n, groups, device=device)
    static = group_size == 0 or options.static_groups
    if static:  # every group's parameters from the original (dead-zeroed) weights
        grouped = w.reshape(n, groups, group)
        importance = torch.diag(h).reshape(groups, group)
        for g in range(groups):
            s, o = _range_qparams(
                grouped[:, g].amin(1, keepdim=True),
                grouped[:, g].amax(1, keepdim=True),
                grouped[:, g],
                importance[g],
                bits,
                symmetric,
                options,
            )
            scale[:, g : g + 1], offset[:, g : g + 1] = s, o

    perm = None
    if options.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    column_group = ((perm.cpu() if perm is not None else torch.arange(k)) // group).tolist()

    hinv = _cholesky_inverse_upper(h, options.damp_percent)
    diag_h = torch.diag(h)
    block = options.block_size
    if not static:  # a group must start and end inside one block
        block = group * max(1, block // group)
    # Work on Wᵀ [k, n]: a column of W is then a contiguous row, which keeps the per-column
    # rank-1 updates on contiguous memory (several times faster on CPU than strided columns).
    wt = w.t().contiguous()
    scale_t, offset_t = scale.t().contiguous(), offset.t().contiguous()  # [groups, n]
    q_t = torch.zeros(k, n, device=device)
    losses = torch.zeros(n, device=device)
    for b1 in range(0, k, block):
        b2 = min(b1 + block, k)
        w1 = wt[b1:b2]  # a view: updated in place
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            col = b1 + i
            if not static and col % group == 0:
                part = w1[i : i + group].t()
                s, o = _range_qparams(
                    part.amin(1, keepdim=True),
                    part.amax(1, keepdim=True),
                    part,
                    diag_h[col : col + group],
                    bits,
                    symmetric,
                    options,
                )
                scale_t[col // group], offset_t[col // group] = s[:, 0], o[:, 0]
            g = column_group[col]
            s, o = scale_t[g], offset_t[g]
            row = w1[i]
            q = torch.clamp(torch.round(row / s + o), qmin, qmax)
            q_t[col] = q
            e = (row - (q - o) * s) / hinv1[i, i]
            losses.add_(e.square(), alpha=0.5)
            w1[i:].sub_(hinv1[i, i:, None] * e)
            err1[i] = e
        wt[b2:].addmm_(hinv[b1:b2, b2:].t(), err1, alpha=-1.0)
    q_int = q_t.t()
    scale, offset = scale_t.t(), offset_t.t()

    if perm is not None:
        q_int = q_int[:, torch.argsort(perm)]
    return GPTQResult(
        weight=q_int.to(torch.int8).cpu().contiguous(),
        scale=scale.cpu().contiguous(),
        offset=offset.cpu().contiguous(),
        loss=float(losses.sum()),
    )


def fallback_reason(inputs: torch.Tensor | None, min_tokens: int) -> str | None:
    """Why a layer cannot be calibrated (and falls back to RTN), or None if it can."""
    if inputs is None:
        return "no calibration inputs"
    rows = int(inputs.reshape(-1, inputs.shape[-1]).shape[0])
    if rows < min_tokens:
        return f"only {rows} calibration tokens (< min_tokens {min_tokens})"
    return None


def rtn_fallback(
    weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec, method: str, reason: str
) -> QuantizedLinear:
    """RTN for a layer a calibrated method cannot handle, marked so the report lists it."""
    layer = rtn_linear(weight, bias, spec, method="rtn")
    layer.extra.update({"fallback": "rtn", "fallback_reason": reason, "requested_method": method})
    return layer


class GPTQMethod(QuantMethod):
    """`method: gptq`: weight-only (W4A16 / W8A16) GPTQ on calibration inputs, layer by layer.

    Linears that read the same input (q/k/v, gate/up) get the same Hessian: it is computed once
    per layer and reused for every linear handed the same input tensor."""

    name = "gptq"
    summary = "int4 (or int8) weights by GPTQ on calibration inputs, float activations"
    bits = 4
    group_size = 64
    needs_calibration = True
    Options = GPTQOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # H per input tensor of the current layer, keyed by its storage: the layer's
        # calibration holds every input alive until the layer is done, so a key cannot be
        # reused by another tensor before prepare_layer starts the next layer and clears this
        self._hessians: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def options_for(self, spec: LayerSpec) -> GPTQOptions:
        """Method options with the layer's `overrides:` options on top."""
        options = self.options
        assert isinstance(options, GPTQOptions)
        if not spec.options:
            return options
        return GPTQOptions.model_validate({**options.model_dump(), **spec.options})

    def prepare_layer(self, view: LayerView, calib: LayerCalibration) -> None:
        self._hessians.clear()

    def hessian(self, inputs: torch.Tensor, device: str) -> torch.Tensor:
        """H of `inputs`, computed once per input tensor of a layer (q/k/v share one input,
        gate/up another)."""
        if not inputs.is_contiguous():  # a reshape would copy: a temporary has no stable key
            return hessian_of(inputs, device)
        key = (inputs.data_ptr(), tuple(inputs.shape))
        if key not in self._hessians:
            self._hessians[key] = hessian_of(inputs, device)
        return self._hessians[key]

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        if spec.activation is not ActivationScheme.NONE:
            raise ValueError("GPTQ quantizes weights only (W4A16 / W8A16): activations stay float")
        options = self.options_for(spec)
        reason = fallback_reason(inputs, options.min_tokens)
        if reason is not None:
            return rtn_fallback(weight, bias, spec, self.name, reason)
        assert inputs is not None
        flat = inputs.reshape(-1, inputs.shape[-1])
        result = gptq_quantize(
            weight,
            self.hessian(flat, self.device),
            bits=spec.bits,
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            options=options,
            device=self.device,
        )
        return QuantizedLinear(
            weight=result.weight,
            weight_scale=result.scale,
            weight_offset=result.offset,
            bits=spec.bits,
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            activation=ActivationScheme.NONE,
            bias=None if bias is None else bias.float(),
            method=self.name,
            extra={
                "gptq_loss": result.loss,
                "calibration_tokens": int(flat.shape[0]),
                "act_order": options.act_order,
            },
        )
