"""Range observers and the scale/offset math every method shares (written once, here).

The seed tool's `act_method` maps onto these: 1 = min-max, 2 = histogram (percentile clipping
chosen by minimising the quantization error over the observed histogram), 3 = auto (histogram
for activations with outliers, min-max otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gcupipe.quant.intmath import qrange

if TYPE_CHECKING:
    import torch

ACT_METHODS = {1: "minmax", 2: "histogram", 3: "auto"}


def scale_offset_from_range(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset so [min, max] maps onto the signed `bits` range.

    Symmetric: scale = max|x| / qmax, offset 0. Asymmetric: scale = (max - min) / (2**bits - 1),
    offset = qmin - round(min / scale), kept >= qmin + 1 because GPTQ's v1 layout stores
    zero - 1 unsigned (a range that starts at 0 loses its top step instead). The range always
    includes 0 so that 0 is exact."""
    import torch

    qmin, qmax = qrange(bits)
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    eps = torch.finfo(torch.float32).tiny * 1e3
    if symmetric:
        scale = torch.maximum(max_val, -min_val) / qmax
        scale = torch.clamp(scale, min=eps)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((max_val - min_val) / (qmax - qmin), min=eps)
    offset = torch.clamp(qmin - torch.round(min_val / scale), qmin + 1, qmax)
    return scale, offset


def quantize(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(round(x / scale + offset)) as int8 (broadcasting scale/offset)."""
    import torch

    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x.float() / scale + offset), qmin, qmax).to(torch.int8)


@dataclass
class MinMaxObserver:
    """Running min/max of everything observed (per tensor)."""

    min_val: float = float("inf")
    max_val: float = float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        self.min_val = min(self.min_val, float(x.min()))
        self.max_val = max(self.max_val, float(x.max()))

    def range(self) -> tuple[float, float]:
        return self.min_val, self.max_val


@dataclass
class HistogramObserver:
    """Histogram of observed values; the range is the clipping that minimises the expected
    squared quantization error (clipping + rounding) over the histogram.

    Bins are re-binned when a wider range arrives, so the order of batches barely matters."""

    bins: int = 2048
    hist: object = None
    lo: float = 0.0
    hi: float = 0.0
    minmax: MinMaxObserver = field(default_factory=MinMaxObserver)

    def observe(self, x: torch.Tensor) -> None:
        import torch

        x = x.detach().float().reshape(-1)
        self.minmax.observe(x)
        lo, hi = min(self.minmax.min_val, 0.0), max(self.minmax.max_val, 0.0)
        if hi <= lo:
            return
        if self.hist is None:
            self.lo, self.hi = lo, hi
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.lo or hi > self.hi:
            old = self.hist
            centers = torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)
            centers = (centers[:-1] + centers[1:]) / 2
            self.lo, self.hi = lo, hi
            self.hist = torch.histc(centers, self.bins, self.lo, self.hi) * 0
            idx = ((centers - self.lo) / (self.hi - self.lo) * self.bins).long()
            self.hist.index_add_(0, idx.clamp(0, self.bins - 1), old)  # type: ignore[arg-type]
        self.hist += torch.histc(x.double(), self.bins, self.lo, self.hi)  # type: ignore[operator]

    def range(self, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
        import torch

        if self.hist is None:
            return self.minmax.range()
        hist = self.hist / self.hist.sum()  # type: ignore[attr-defined]
        edges = torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)
        centers = (edges[:-1] + edges[1:]) / 2
        fracs = torch.cat([torch.logspace(-2, 0, 60, dtype=torch.float64), torch.ones(1)])
        his = self.hi * fracs
        los = self.lo * fracs
        if symmetric:
            bounds = torch.maximum(his, -los)
            his, los = bounds, -bounds
            pairs_lo, pairs_hi = los, his
        else:
            pairs_lo = los.repeat_interleave(len(his))
            pairs_hi = his.repeat(len(los))
        levels = 2**bits - 1
        step = torch.clamp(pairs_hi - pairs_lo, min=1e-12) / levels
        clipped = torch.minimum(torch.maximum(centers, pairs_lo[:, None]), pairs_hi[:, None])
        err = ((centers - clipped) ** 2 + (step[:, None] ** 2) / 12.0) @ hist
        best = int(torch.argmin(err))
        return float(pairs_lo[best]), float(pairs_hi[best])


def make_observer(act_method: int | str) -> MinMaxObserver | HistogramObserver:
    name = ACT_METHODS.get(act_method, act_method) if isinstance(act_method, int) else act_method
    if name == "minmax":
        return MinMaxObserver()
    if name in ("histogram", "auto"):
        return HistogramObserver()
    raise ValueError(f"unknown activation observer {act_method!r}")


def observed_range(
    observer: MinMaxObserver | HistogramObserver,
    act_method: int | str,
    bits: int = 8,
    symmetric: bool = False,
) -> tuple[float, float]:
    """The range to quantize with. `auto` keeps min-max unless the histogram clipping shrinks
    the range by more than 10% (a sign of outliers worth clipping)."""
    name = ACT_METHODS.get(act_method, act_method) if isinstance(act_method, int) else act_method
    if isinstance(observer, MinMaxObserver):
        return observer.range()
    clipped = observer.range(bits, symmetric)
    if name == "histogram":
        return clipped
    full = observer.minmax.range()
    width_full = full[1] - full[0]
    if width_full > 0 and (clipped[1] - clipped[0]) < 0.9 * width_full:
        return clipped
    return full
