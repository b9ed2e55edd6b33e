"""Numeric checks of a quantized model against its float source: perplexity, top-1 agreement,
per-layer SQNR.

Agreement is teacher-forced on the eval text and counted only where the float model is
confident: at positions whose top-1 logit leads the runner-up by at least `agreement_margin`.
Greedy continuations of a few prompts, the obvious alternative, turn float-rounding noise into
flipped tokens: per-token int8 activations make near-ties chaotic, so two CPUs disagree by
several points on 2 x 6 tokens (benchmarks/greedy_stability.py measures it). Confident
positions over thousands of tokens leave that noise a fraction of a point.

Per-layer SQNR is measured where the error is made: a forward hook on every quantized linear of
the quantized model sees that layer's real input and output, and compares the output with the
float weight's output on the same input, 10·log10(‖y_float‖² / ‖y_float − y_quant‖²). Nothing
is stored per layer but two running sums, so it costs one extra matmul per layer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gcupipe.errors import require

if TYPE_CHECKING:
    from gcupipe.runtime.perplexity import PerplexityResult

_EXPERT = re.compile(
    r"^(?P<experts>.+\.mlp\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|"
    r"down_proj)$"
)


@dataclass
class NumericMetrics:
    ppl_float: float | None = None
    ppl_quantized: float | None = None
    ppl_increase: float | None = None  # relative: ppl_quantized / ppl_float - 1
    scored_tokens: int = 0
    token_agreement: float | None = None  # top-1 agreement at the confident positions
    agreement_margin: float = 0.0  # logit lead that makes a float position confident
    confident_positions: int = 0
    mean_abs_logprob_delta: float | None = None  # |log p_float - log p_quant| of the true token
    sqnr_db: dict[str, float] = field(default_factory=dict)
    worst_layers: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def compare_scores(
    floating: PerplexityResult,
    quantized: PerplexityResult,
    agreement_margin: float,
    metrics: NumericMetrics | None = None,
) -> NumericMetrics:
    """Perplexities, confident-position top-1 agreement and the mean log-prob change of two
    models scored on the same tokens."""
    metrics = metrics or NumericMetrics()
    ref, got = floating.positions, quantized.positions
    if len(ref.top1) != len(got.top1):
        raise ValueError("the two models were scored on different tokens")
    metrics.ppl_float, metrics.ppl_quantized = floating.ppl, quantized.ppl
    metrics.ppl_increase = quantized.ppl / floating.ppl - 1.0
    metrics.scored_tokens = quantized.scored_tokens
    confident = [i for i, lead in enumerate(ref.margin) if lead >= agreement_margin]
    same = sum(ref.top1[i] == got.top1[i] for i in confident)
    metrics.agreement_margin = agreement_margin
    metrics.confident_positions = len(confident)
    metrics.token_agreement = same / len(confident) if confident else None
    deltas = [abs(a - b) for a, b in zip(ref.target_logprob, got.target_logprob, strict=True)]
    metrics.mean_abs_logprob_delta = sum(deltas) / len(deltas)
    metrics.seconds["perplexity_float"] = floating.seconds
    metrics.seconds["perplexity_quantized"] = quantized.seconds
    return metrics


def float_weights(reference: Any) -> dict[str, tuple[Any, Any]]:
    """Module prefix -> (float weight [n, k], bias) from the float model, experts split."""
    weights: dict[str, tuple[Any, Any]] = {}
    state = reference.state_dict()
    for name, tensor in state.items():
        if name.endswith(".weight") and tensor.dim() == 2:
            prefix = name[: -len(".weight")]
            weights[prefix] = (tensor, state.get(f"{prefix}.bias"))
        elif name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len(".gate_up_proj")]
            for e in range(tensor.shape[0]):
                gate, up = tensor[e].chunk(2, dim=0)
                weights[f"{prefix}.{e}.gate_proj"] = (gate, None)
                weights[f"{prefix}.{e}.up_proj"] = (up, None)
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            for e in range(tensor.shape[0]):
                weights[f"{prefix}.{e}.down_proj"] = (tensor[e], None)
    return weights


def runtime_prefix(name: str) -> str:
    """Module name inside the runtime model -> checkpoint prefix (experts are ModuleLists
    named `<experts>.gate_proj.<e>` there, `<experts>.<e>.gate_proj` in checkpoints)."""
    match = re.match(
        r"^(?P<experts>.+\.mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)"
        r"\.(?P<index>\d+)$",
        name,
    )
    if match:
        return f"{match['experts']}.{match['index']}.{match['proj']}"
    return name


def sqnr_hooks(
    modules: Any, floats: dict[str, tuple[Any, Any]], sums: dict[str, list[float]]
) -> list[Any]:
    """Forward hooks on the RuntimeLinears among `modules` ((checkpoint prefix, module) pairs)
    that add each call's signal and noise energy to `sums[prefix]`; returns the handles."""
    torch = require("torch", "quant")
    from gcupipe.runtime.linear import RuntimeLinear

    def hook_for(prefix: str, weight: Any, bias: Any) -> Any:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].float()
            if module.smooth_scale is not None:  # the float weight reads the unsmoothed input
                x = x * module.smooth_scale
            want = torch.nn.functional.linear(
                x, weight.float(), None if bias is None else bias.float()
            )
            signal, noise = sums.setdefault(prefix, [0.0, 0.0])
            sums[prefix] = [
                signal + float((want**2).sum()),
                noise + float(((want - output.float()) ** 2).sum()),
            ]

        return hook

    return [
        module.register_forward_hook(hook_for(prefix, *floats[prefix]))
        for prefix, module in modules
        if isinstance(module, RuntimeLinear) and prefix in floats
    ]


def _sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); a layer whose output holds NaN or inf is the worst there can
    be (-inf dB), not a perfect one; an exact layer is +inf."""
    if not (math.isfinite(signal) and math.isfinite(noise)):
        return -math.inf
    if signal <= 0:
        return 0.0
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


def finish_sqnr(
    sums: dict[str, list[float]], worst: int, metrics: NumericMetrics
) -> NumericMetrics:
    """SQNR in dB per layer from the summed energies, and the `worst` lowest."""
    metrics.sqnr_db = {p: _sqnr_db(s, n) for p, (s, n) in sums.items()}
    ranked = sorted(metrics.sqnr_db, key=lambda p: metrics.sqnr_db[p])
    metrics.worst_layers = ranked[:worst]
    return metrics


def layer_sqnr(
    quantized: Any,
    reference: Any,
    batches: Sequence[Sequence[int]],
    worst: int = 5,
    metrics: NumericMetrics | None = None,
) -> NumericMetrics:
    """SQNR in dB of every quantized linear, on the inputs it sees in `batches`."""
    torch = require("torch", "quant")

    metrics = metrics or NumericMetrics()
    sums: dict[str, list[float]] = {}
    modules = ((runtime_prefix(name), module) for name, module in quantized.named_modules())
    handles = sqnr_hooks(modules, float_weights(reference), sums)
    try:
        with torch.inference_mode():
            for batch in batches:
                quantized(torch.as_tensor([list(batch)], dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    return finish_sqnr(sums, worst, metrics)
