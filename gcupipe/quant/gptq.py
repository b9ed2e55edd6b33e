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
  g_idx stays contiguous (i // g): the vLLM-GCU loader rejects shuffled g_idx;
- once the integers are chosen, each row's group scales are refit to them by least squares on H
  (`refit_scales`): the scales fixed before rounding are no longer the best ones for the rounded
  weights. SmolLM2 w4 g64, full eval text: 40.27 -> 40.08;
- asymmetric calibration (Li et al., 2025, GPTAQ): the layer's inputs X̃ come from the already
  quantized layers, so plain GPTQ reproduces what the layer would output on *drifted* inputs.
  With the float model's inputs X of the same tokens carried beside them, GPTQ rounds a target
  W* moved towards the weights that map X̃ to the float outputs X Wᵀ (`float_target`). Moving
  all the way overcorrects (the quantization noise in X̃ is not a drift a linear map undoes:
  least squares shrinks the weights, and the shrinkage compounds layer after layer); a fifth of
  the way is best. SmolLM2 w4 g64, 16,384 eval tokens: strength 0 -> 39.09, 0.1 -> 38.45,
  0.2 -> 38.35, 0.3 -> 38.54, 0.5 -> 39.40, 1 -> 153.2 (capture-then-quantize builds).
  The fit has one unknown per input channel, so it needs many tokens per channel: SmolLM2 had
  ≥ 10.7 (16,384 tokens, k ≤ 1,536); the tiny test models at 2 (256 tokens, k = 128) went from
  0.16-0.21 relative logit error to 0.20-0.47, and on one repeated sentence to 1.3. Below
  `asymmetric_min_tokens` (10) per channel a linear gets plain GPTQ. Those tokens are H's: the
  drift D is measured on the first `asymmetric_tokens` only (whole samples; the float model
  runs on those alone), H+λI being what conditions the fit. Quantizing in the layer's one
  forward (each linear on inputs from the layer's already quantized linears, whose error the
  target then also aims past), SmolLM2 w4 g64 asym-0.2, full eval text, AVX-512 BF16, one run
  each: drift on 2,048 tokens 39.72 in 48 s, 4,096 39.39 in 53 s, 8,192 39.28 in 57 s, every
  token 39.42 in 74 s; plain GPTQ 40.15 in 39 s. Its cost: the float forward over those
  samples, the drift X̃ᵀ(X − X̃) and one Cholesky solve per stack (`float_target`); H is
  GPTQ's own.

The result is the shared `QuantizedLinear` (quant/scheme.py), so every format writer handles it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from pydantic import Field

from gcupipe.errors import StageError
from gcupipe.quant.intmath import qrange
from gcupipe.quant.methods import (
    LayerCalibration,
    LayerSpec,
    LayerView,
    LinearJob,
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
    refit_scales: bool = Field(
        default=True,
        description="Once the integers are chosen, refit each row's group scales to them by "
        "least squares on H.",
    )
    min_tokens: int = Field(
        default=32,
        ge=0,
        description="Fewer calibration tokens (a rarely routed expert): RTN instead.",
    )
    asymmetric_calibration: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Aim at the float model's outputs instead of this layer's own: 0 = plain "
        "GPTQ, 1 = the weights that best map the quantized model's inputs to the float model's "
        "outputs (GPTAQ's asymmetric calibration; the float model also runs on "
        "asymmetric_tokens).",
    )
    asymmetric_tokens: int = Field(
        default=2048,
        gt=0,
        description="Calibration tokens (whole samples, from the first) the float model also "
        "runs on for asymmetric calibration: the drift is measured on them, H on every token.",
    )
    asymmetric_min_tokens: float = Field(
        default=10.0,
        ge=0,
        description="Calibration tokens per input channel below which a linear gets plain GPTQ "
        "instead of asymmetric calibration: the float target is a least-squares fit with one "
        "unknown per input channel, and too few tokens fit their noise.",
    )

    def check(self, group_size: int) -> list[str]:
        if self.act_order and group_size > 0 and not self.static_groups:
            return [ACT_ORDER_NEEDS_STATIC_GROUPS]
        return []


GRAM_BLOCK = 512
"""Column block of the Gram matrix xᵀx: only blocks on or above the diagonal are multiplied (the
rest is their transpose), 10 of 16 block products for k = 1536 (-31% time measured in bf16)."""


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx [k, k] in fp32 of x [m, k], multiplied in x's dtype block by block using symmetry."""
    import torch

    k = x.shape[1]
    out = torch.empty(k, k, dtype=torch.float32, device=x.device)
    edges = [*range(0, k, GRAM_BLOCK), k]
    for a, b in pairwise(edges):
        for c, d in pairwise(edges[edges.index(a) :]):
            block = torch.mm(x[:, a:b].t(), x[:, c:d])
            out[a:b, c:d] = block
            if c != a:
                out[c:d, a:b] = block.t()
    return out


class HessianAccumulator:
    """Running H = 2/N Σ xᵀx over every calibration row seen, batch by batch, summed in fp32.

    The products run in the inputs' dtype: fp32 inputs give fp32 products; bf16 inputs (bf16
    calibration forwards) give bf16 products at twice the speed, each chunk's sum rounded to
    bf16 once before it joins the fp32 total (perplexity unchanged, quant/precision.py)."""

    def __init__(self, in_features: int, device: str = "cpu", chunk_rows: int = 8192):
        import torch

        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.rows = 0
        self.chunk_rows = chunk_rows

    def add(self, inputs: torch.Tensor) -> None:
        """Fold a batch [..., k] into the running mean (rescaling what was there)."""
        import torch

        x = inputs.reshape(-1, self.hessian.shape[0])
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        for start in range(0, x.shape[0], self.chunk_rows):
            chunk = x[start : start + self.chunk_rows].to(self.hessian.device)
            total = self.rows + chunk.shape[0]
            self.hessian.mul_(self.rows / total).add_(gram(chunk), alpha=2.0 / total)
            self.rows = total


def hessian_of(inputs: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """H = 2XᵀX/N of calibration inputs [tokens, k]."""
    acc = HessianAccumulator(int(inputs.shape[-1]), device)
    acc.add(inputs)
    return acc.hessian


def drift_of(inputs: torch.Tensor, float_inputs: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """D = 2X̃ᵀ(X − X̃)/N [k, k] in fp32 (H's scale): how the quantized model's inputs X̃ drifted
    from the float model's inputs X, over the tokens of X (the first rows of X̃). Subtracted and
    multiplied in the inputs' dtype: in bf16, X − X̃ is rounded once relative to the drift."""
    import torch

    k = inputs.shape[-1]
    x_f = float_inputs.reshape(-1, k)
    x_q = inputs.reshape(-1, k)[: x_f.shape[0]]  # the float model ran on the first samples
    drift = torch.zeros(k, k, dtype=torch.float32, device=device)
    for start in range(0, x_q.shape[0], DRIFT_CHUNK):
        a = x_q[start : start + DRIFT_CHUNK].to(device)
        moved = x_f[start : start + DRIFT_CHUNK].to(device, a.dtype) - a
        drift.add_(torch.mm(a.t(), moved), alpha=2.0 / x_q.shape[0])
    return drift


DRIFT_CHUNK = 8192
"""Rows of X̃ and X multiplied at a time for the drift X̃ᵀ(X − X̃)."""


def float_target(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    drift: torch.Tensor,
    damp_percent: float,
    strength: float,
) -> torch.Tensor:
    """The weight [n, k] GPTQ should round so that the quantized model's inputs X̃ reproduce the
    float model's outputs X Wᵀ (Li et al., 2025, asymmetric calibration):

        min_Ŵ ‖X Wᵀ − X̃ Ŵᵀ‖²  =  min_Ŵ ‖X̃ (W* − Ŵ)ᵀ‖² + const,   W* = W (X̃ᵀX)ᵀ (X̃ᵀX̃)⁻¹,

    so GPTQ on W* with its usual H = 2X̃ᵀX̃/N solves it. `strength` moves from W (0) to W* (1).
    With X̃ᵀX = X̃ᵀX̃ + X̃ᵀ(X − X̃) and H dampened as GPTQ dampens it (H + λI):

        W* − W = W (D − λI)ᵀ (H + λI)⁻¹,   D = 2X̃ᵀ(X − X̃)/N (`drift_of`),

    H + λI solved by Cholesky in float64 (its condition number can exceed fp32's precision) for
    the n rows of W."""
    import torch

    lower, damp = damped_cholesky(hessian.double(), damp_percent)
    w_t = weight.to(hessian.device, torch.float32).t()
    rhs = (drift.to(w_t) @ w_t).sub_(w_t, alpha=damp).double()  # (D − λI) Wᵀ  [k, n]
    step = torch.cholesky_solve(rhs, lower).t().float()  # W (D − λI)ᵀ (H + λI)⁻¹
    return w_t.t() + strength * step


@dataclass
class InputStatistics:
    """What GPTQ reads of the calibration inputs X̃ [tokens, k] that some linears share:
    H = 2X̃ᵀX̃/N and, given the float model's inputs X of the first tokens, the drift D
    (`drift_of`). Each is multiplied once, when first asked for, however many stacks or searches
    read it; `scaled(s)` gives those of X̃ / s (AWQ's readers, whose weights were multiplied by s)
    from the same products: S⁻¹ H S⁻¹."""

    inputs: torch.Tensor
    float_inputs: torch.Tensor | None = None
    device: str = "cpu"
    scale: torch.Tensor | None = None
    products: dict[str, torch.Tensor] = field(default_factory=dict)  # shared by scaled copies

    @property
    def tokens(self) -> int:
        return int(self.inputs.reshape(-1, self.inputs.shape[-1]).shape[0])

    @property
    def has_drift(self) -> bool:
        return (
            self.float_inputs is not None and 0 < self.float_inputs.numel() <= self.inputs.numel()
        )

    def hessian(self) -> torch.Tensor:
        if "hessian" not in self.products:
            self.products["hessian"] = hessian_of(self.inputs, self.device)
        return self._in_scale(self.products["hessian"])

    def drift(self) -> torch.Tensor:
        assert self.float_inputs is not None
        if "drift" not in self.products:
            self.products["drift"] = drift_of(self.inputs, self.float_inputs, self.device)
        return self._in_scale(self.products["drift"])

    def scaled(self, scale: torch.Tensor) -> InputStatistics:
        return replace(self, scale=scale)

    def _in_scale(self, matrix: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return matrix
        s = self.scale.to(matrix)
        return matrix / (s[:, None] * s[None, :])


class StatisticsByInput:
    """One `InputStatistics` per captured input tensor, so every stack and search reading that
    tensor shares its products. Each entry holds its tensor, so an id stays that tensor's."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._entries: dict[int, InputStatistics] = {}

    def of(self, inputs: torch.Tensor, float_inputs: torch.Tensor | None = None) -> InputStatistics:
        key = id(inputs)
        if key not in self._entries:
            self._entries[key] = InputStatistics(inputs, float_inputs, self.device)
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


def damped_cholesky(hessian: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """The lower Cholesky factor of H + λI and λ = damp × mean diag(H), GPTQ's dampening (damp 0:
    none, unless needed); retried with 10x more dampening (from 1e-6 when 0) while H + λI is not
    numerically positive definite (very few calibration tokens, say)."""
    import torch

    mean_diag = float(torch.mean(torch.diag(hessian)))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = damp_percent
    for _ in range(7):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0 and bool(torch.isfinite(lower).all()):
            return lower, damp * mean_diag
        damp = max(10 * damp, 1e-6)
    raise ValueError("the GPTQ Hessian is not positive definite even with much more dampening")


def _range_qparams(
    weights: torch.Tensor,
    importance: torch.Tensor | None,
    bits: int,
    symmetric: bool,
    options: GPTQOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/offset [..., 1] for groups of weights [..., g]: min-max, or the best shrunk range.

    The clipping search tries ranges (1 - f) x [min, max] and keeps, per group, the one whose
    rounding error Σ_j h_j (w_j - q_j)² is smallest (h = diag(H) of those columns, broadcast
    against [..., g]): a shrunk range rounds the bulk of the weights more finely at the cost of
    clipping a few outliers."""
    import torch

    lo, hi = weights.amin(-1, keepdim=True), weights.amax(-1, keepdim=True)
    if not options.clip_search or options.clip_grid <= 1:
        return scale_offset_from_range(lo, hi, bits, symmetric)
    qmin, qmax = qrange(bits)
    shrink = torch.linspace(0.0, options.clip_max_shrink, options.clip_grid, device=lo.device)
    factors = 1.0 - shrink  # [s]; factor 1 (plain min-max) first, so ties keep it
    scale, offset = scale_offset_from_range(lo * factors, hi * factors, bits, symmetric)  # [..., s]
    w, scale_e, offset_e = weights.unsqueeze(-2), scale.unsqueeze(-1), offset.unsqueeze(-1)
    error = (w / scale_e).add_(offset_e).round_().clamp_(qmin, qmax)  # [..., s, g]
    error.sub_(offset_e).mul_(scale_e).sub_(w).square_()
    if importance is not None:
        error.mul_(importance.unsqueeze(-2))
    best = error.sum(dim=-1).argmin(dim=-1, keepdim=True)  # [..., 1]
    return scale.gather(-1, best), offset.gather(-1, best)


def _static_qparams(
    w: torch.Tensor,
    importance: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool,
    options: GPTQOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/offset [n, groups] of every group of `w` [n, k] at once, in chunks of rows whose
    search temporaries ([rows, groups, grid, g]) stay about a million numbers."""
    import torch

    n, k = w.shape
    groups = k // group
    grouped, weight_of = w.reshape(n, groups, group), importance.reshape(groups, group)
    rows = max(1, (1 << 20) // (k * max(1, options.clip_grid)))
    parts = [
        _range_qparams(grouped[r : r + rows], weight_of, bits, symmetric, options)
        for r in range(0, n, rows)
    ]
    return torch.cat([s for s, _ in parts])[..., 0], torch.cat([o for _, o in parts])[..., 0]


def _cholesky_inverse_upper(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, dampened as `damped_cholesky` dampens.

    With J the order-reversing permutation and J H J = L Lᵀ (L lower), H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)
    and J L⁻¹ J is upper triangular: one Cholesky factorisation and one triangular inverse."""
    import torch

    lower, _damp = damped_cholesky(hessian.flip(0, 1), damp_percent)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    inverse = torch.linalg.solve_triangular(lower, eye, upper=False)
    if not bool(torch.isfinite(inverse).all()):
        raise ValueError("the GPTQ Hessian's inverse overflows: too few calibration tokens")
    upper: torch.Tensor = inverse.flip(0, 1)
    return upper


REFIT_CHUNK = 1 << 24
"""Numbers held by the refit's [rows, groups, k] products at a time (64 MiB of fp32)."""


def refit_scales(
    weight: torch.Tensor,
    levels: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    hessian: torch.Tensor,
    group: int,
) -> torch.Tensor:
    """Group scales [n, groups] that minimise (w - ŵ)ᵀ H (w - ŵ) per row for the integers GPTQ
    chose, ŵ_j = s_g(j) (q_j - o_g(j)).

    GPTQ fixes each group's scale before rounding and then moves the weights; once the integers
    are known the best scales are a small linear least-squares problem per row: A s = b with
    A_ab = Σ_{i∈a, j∈b} q'_i H_ij q'_j and b_a = Σ_{i∈a} q'_i (H w)_i, q' = q - o. A row keeps
    its old scales where the solve does not lower its error (a singular A, a sign flip)."""
    import torch

    n, k = weight.shape
    groups = k // group
    out = scale.clone()
    h_rows = hessian.reshape(groups, group, k)
    rows = max(1, REFIT_CHUNK // (groups * k))
    for r in range(0, n, rows):
        lv = levels[r : r + rows].float().reshape(-1, groups, group)
        lv = lv - offset[r : r + rows].unsqueeze(-1)
        w = weight[r : r + rows]
        t = torch.einsum("rai,aik->rak", lv, h_rows)  # [rows, groups, k]: (q'_a ⊗ H rows of a)
        a = torch.einsum("rabj,rbj->rab", t.reshape(-1, groups, groups, group), lv)
        b = torch.einsum("rak,rk->ra", t, w)
        old = scale[r : r + rows]
        ridge = 1e-6 * torch.diagonal(a, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
        eye = torch.eye(groups, dtype=a.dtype, device=a.device)
        new = torch.linalg.solve(a + ridge[:, None, None] * eye, b.unsqueeze(-1))[..., 0]
        # the row errors minus the constant wᵀHw: sᵀAs - 2bᵀs
        new_error = torch.einsum("ra,rab,rb->r", new, a, new) - 2 * (b * new).sum(-1)
        old_error = torch.einsum("ra,rab,rb->r", old, a, old) - 2 * (b * old).sum(-1)
        usable = torch.isfinite(new).all(-1) & (new > 0).all(-1) & (new_error < old_error)
        out[r : r + rows] = torch.where(usable[:, None], new, old)
    return out


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
    row_loss: torch.Tensor  # fp32 [n]: Σ_j (w - q)² / [H⁻¹]_jj / 2, what GPTQ minimises greedily

    @property
    def loss(self) -> float:
        return float(self.row_loss.sum())

    def rows(self, start: int, stop: int) -> GPTQResult:
        """The result of output rows start:stop (one linear of a stacked group)."""
        return GPTQResult(
            self.weight[start:stop],
            self.scale[start:stop],
            self.offset[start:stop],
            self.row_loss[start:stop],
        )


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

    static = group_size == 0 or options.static_groups
    if static:  # every group's parameters from the original (dead-zeroed) weights
        scale, offset = _static_qparams(w, torch.diag(h), bits, group, symmetric, options)
    else:
        scale = torch.zeros(n, groups, device=device)
        offset = torch.zeros(n, groups, device=device)

    original, original_h = w, h  # the loop below works on copies
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
        inverse_diag = (1.0 / torch.diag(hinv1)).tolist()
        with sequential_cpu_ops(device):  # the many tiny ops of the column loop, in place
            for i in range(b2 - b1):
                col = b1 + i
                if not static and col % group == 0:
                    part = w1[i : i + group].t()
                    s, o = _range_qparams(part, diag_h[col : col + group], bits, symmetric, options)
                    scale_t[col // group], offset_t[col // group] = s[:, 0], o[:, 0]
                g = column_group[col]
                s, o = scale_t[g], offset_t[g]
                row, q, e = w1[i], q_t[col], err1[i]
                torch.div(row, s, out=q)
                if not symmetric:
                    q.add_(o)
                q.round_().clamp_(qmin, qmax)
                if symmetric:
                    torch.mul(q, s, out=e)
                else:
                    torch.sub(q, o, out=e).mul_(s)
                torch.sub(row, e, out=e).mul_(inverse_diag[i])  # (w - deq) / [H⁻¹]_jj
                w1[i:].addr_(hinv1[i, i:], e, alpha=-1.0)
        losses.add_(err1.square().sum(0), alpha=0.5)
        wt[b2:].addmm_(hinv[b1:b2, b2:].t(), err1, alpha=-1.0)
    q_int = q_t.t()
    scale, offset = scale_t.t(), offset_t.t()

    if perm is not None:
        q_int = q_int[:, torch.argsort(perm)]
    if options.refit_scales:
        scale = refit_scales(original, q_int, scale, offset, original_h, group)
    return GPTQResult(
        weight=q_int.to(torch.int8).cpu().contiguous(),
        scale=scale.cpu().contiguous(),
        offset=offset.cpu().contiguous(),
        row_loss=losses.cpu(),
    )


def asymmetric_strength(options: GPTQOptions, tokens: int, in_features: int) -> float:
    """The asymmetric calibration GPTQ applies to a linear reading `in_features` features,
    calibrated on `tokens` tokens: none below `asymmetric_min_tokens` per input channel."""
    if tokens < options.asymmetric_min_tokens * in_features:
        return 0.0
    return options.asymmetric_calibration


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

    GPTQ treats every output row on its own given H, so linears that read the same input
    (q/k/v, gate/up) and share a spec are stacked into one weight: one Hessian, one Cholesky
    factorisation and one column loop for the group instead of one per linear."""

    name = "gptq"
    summary = "int4 (or int8) weights by GPTQ on calibration inputs, float activations"
    bits = 4
    group_size = 64
    needs_calibration = True
    in_forward = True
    Options = GPTQOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the statistics of the current layer's inputs: linears reading one input share them
        self._statistics = StatisticsByInput(self.device)

    def float_samples(self, samples: int, seq_len: int) -> int:
        assert isinstance(self.options, GPTQOptions)
        if self.options.asymmetric_calibration == 0:
            return 0
        return min(samples, math.ceil(self.options.asymmetric_tokens / seq_len))

    def prepare_layer(self, view: LayerView, calib: LayerCalibration) -> None:
        self._statistics.clear()  # they hold the previous layer's inputs

    def float_targets_for(self, tokens: int, in_features: int) -> bool:
        assert isinstance(self.options, GPTQOptions)
        return asymmetric_strength(self.options, tokens, in_features) > 0

    def options_for(self, spec: LayerSpec) -> GPTQOptions:
        """Method options with the layer's `overrides:` options on top."""
        options = self.options
        assert isinstance(options, GPTQOptions)
        if not spec.options:
            return options
        return GPTQOptions.model_validate({**options.model_dump(), **spec.options})

    def quantize_linears(
        self,
        jobs: list[LinearJob],
        statistics: Callable[[LinearJob], InputStatistics | None] | None = None,
    ) -> Iterator[tuple[str, QuantizedLinear]]:
        """GPTQ for each job; the jobs whose `statistics` are one object (by default: one per
        input tensor, kept for the layer's later calls) and whose specs are equal are quantized
        as one stack."""
        if statistics is None:

            def statistics(job: LinearJob) -> InputStatistics | None:
                if job.inputs is None:
                    return None
                return self._statistics.of(job.inputs, job.float_inputs)

        done: dict[str, QuantizedLinear] = {}
        for job in jobs:
            if job.module not in done:
                stats = statistics(job)
                group = [job]  # too few tokens: RTN, one linear at a time
                if fallback_reason(job.inputs, self.options_for(job.spec).min_tokens) is None:
                    group = [
                        j
                        for j in jobs
                        if j.module not in done and statistics(j) is stats and j.spec == job.spec
                    ]
                parts = self.quantize_stacked(
                    [j.linear.weight.detach() for j in group],
                    [j.bias() for j in group],
                    stats,
                    job.spec,
                )
                done.update(zip((j.module for j in group), parts, strict=True))
            yield job.module, done.pop(job.module)

    def quantize_layer(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        inputs: torch.Tensor | None,
        spec: LayerSpec,
    ) -> QuantizedLinear:
        stats = None if inputs is None else InputStatistics(inputs, device=self.device)
        return self.quantize_stacked([weight], [bias], stats, spec)[0]

    def quantize_stacked(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        statistics: InputStatistics | None,
        spec: LayerSpec,
    ) -> list[QuantizedLinear]:
        """One QuantizedLinear per weight; the weights all read the inputs of `statistics` and
        are quantized as the rows of one stacked matrix (aimed at the float model's outputs when
        asymmetric_calibration is set and the statistics have the float model's inputs)."""
        import torch

        if spec.activation is not ActivationScheme.NONE:
            raise ValueError("GPTQ quantizes weights only (W4A16 / W8A16): activations stay float")
        options = self.options_for(spec)
        weight = torch.cat(weights).float()
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + w.shape[0])
        reason = fallback_reason(
            None if statistics is None else statistics.inputs, options.min_tokens
        )
        if reason is not None:
            return [
                rtn_fallback(weight[a:b], bias, spec, self.name, reason)
                for (a, b), bias in zip(pairwise(bounds), biases, strict=True)
            ]
        assert statistics is not None
        hessian = statistics.hessian()
        strength = 0.0
        if statistics.has_drift:
            strength = asymmetric_strength(options, statistics.tokens, weight.shape[1])
        if strength > 0:
            weight = float_target(
                weight, hessian, statistics.drift(), options.damp_percent, strength
            )
        result = gptq_quantize(
            weight,
            hessian,
            bits=spec.bits,
            group_size=spec.group_size,
            symmetric=spec.symmetric,
            options=options,
            device=self.device,
        )
        out = []
        for (a, b), bias in zip(pairwise(bounds), biases, strict=True):
            part = result.rows(a, b)
            out.append(
                QuantizedLinear(
                    weight=part.weight.contiguous(),
                    weight_scale=part.scale.contiguous(),
                    weight_offset=part.offset.contiguous(),
                    bits=spec.bits,
                    group_size=spec.group_size,
                    symmetric=spec.symmetric,
                    activation=ActivationScheme.NONE,
                    bias=None if bias is None else bias.float(),
                    method=self.name,
                    extra={
                        "gptq_loss": part.loss,
                        "calibration_tokens": statistics.tokens,
                        "act_order": options.act_order,
                        "asymmetric_calibration": strength,
                    },
                )
            )
        return out
