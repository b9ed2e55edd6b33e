"""Numeric checks of a quantized model against its float source: perplexity, greedy agreement,
per-layer SQNR.

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
from typing import Any

from gcupipe.errors import require

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The most important thing to remember about water is",
    "def fibonacci(n):",
)
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
    token_agreement: float | None = None  # teacher-forced, over all prompts
    agreement_mode: str = "greedy continuations"  # or "teacher-forced (layered)"
    exact_continuations: int = 0
    prompts: int = 0
    sqnr_db: dict[str, float] = field(default_factory=dict)
    worst_layers: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def compare_perplexity(
    quantized: Any,
    reference: Any,
    token_ids: Sequence[int],
    window: int = 512,
    stride: int = 512,
    metrics: NumericMetrics | None = None,
) -> NumericMetrics:
    from gcupipe.runtime.perplexity import perplexity

    metrics = metrics or NumericMetrics()
    ref = perplexity(reference, token_ids, window, stride)
    got = perplexity(quantized, token_ids, window, stride)
    metrics.ppl_float, metrics.ppl_quantized = ref.ppl, got.ppl
    metrics.ppl_increase = got.ppl / ref.ppl - 1.0
    metrics.scored_tokens = got.scored_tokens
    metrics.seconds["perplexity_float"] = ref.seconds
    metrics.seconds["perplexity_quantized"] = got.seconds
    return metrics


def compare_generation(
    quantized: Any,
    reference: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 16,
    metrics: NumericMetrics | None = None,
) -> NumericMetrics:
    """Teacher-forced agreement with the float model's greedy continuations (one early
    divergence does not count every later token as a miss), plus exact full matches."""
    from gcupipe.runtime.perplexity import greedy_generate, teacher_forced_agreement

    metrics = metrics or NumericMetrics()
    agree = total = exact = 0
    for prompt in prompts:
        ref_new = greedy_generate(reference, prompt, max_new_tokens)
        share = teacher_forced_agreement(quantized, prompt, ref_new)
        agree += round(share * len(ref_new))
        total += len(ref_new)
        exact += int(greedy_generate(quantized, prompt, max_new_tokens) == ref_new)
    metrics.token_agreement = agree / total if total else 1.0
    metrics.exact_continuations = exact
    metrics.prompts = len(prompts)
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


def finish_sqnr(
    sums: dict[str, list[float]], worst: int, metrics: NumericMetrics
) -> NumericMetrics:
    """SQNR in dB per layer from the summed energies, and the `worst` lowest."""
    metrics.sqnr_db = {
        p: (10 * math.log10(s / n) if n > 0 else math.inf) if s > 0 else 0.0
        for p, (s, n) in sums.items()
    }
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
