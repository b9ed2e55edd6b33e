"""Numeric checks for models larger than memory: both models scored one decoder layer at a time.

The ppl and agreement gates compare `layered_perplexity` passes of the float and the quantized
model over the same windows, exactly as whole-model mode compares its two passes. Per-layer SQNR
rides on the float pass: before each float layer runs, the quantized version of that layer is
built and run on the float model's hidden states of the first windows (up to `sqnr_tokens`), its
linears hooked as in whole-model mode. So it measures each layer's own error on float inputs, not
the error accumulated by the quantized layers before it; one float and one quantized layer are in
memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gcupipe.validation.numeric import NumericMetrics


def _first_tokens(inputs: list[Any], tokens: int) -> Iterator[Any]:
    """The windows' hidden states cut to `tokens` positions in all (a causal layer's outputs on
    a prefix are the prefix of its outputs)."""
    for hidden in inputs:
        if tokens <= 0:
            return
        yield hidden[:, :tokens]
        tokens -= hidden.shape[1]


def layered_numeric(
    model_dir: Path,
    reference: Path,
    token_ids: Sequence[int],
    window: int,
    stride: int,
    agreement_margin: float,
    sqnr_tokens: int,
    worst_layers: int,
    log: Callable[[str], None] = print,
) -> NumericMetrics:
    """Perplexities, confident top-1 agreement and per-layer SQNR of `model_dir` against its
    float `reference`, never holding more than one decoder layer of each."""
    from gcupipe.runtime.layered import ModelLayers, layered_perplexity
    from gcupipe.validation.numeric import (
        compare_scores,
        finish_sqnr,
        float_weights,
        runtime_prefix,
        sqnr_hooks,
    )

    quantized_layers = ModelLayers(model_dir)
    sums: dict[str, list[float]] = {}

    def probe(index: int, float_layer: Any, inputs: list[Any]) -> None:
        prefix = f"model.layers.{index}."
        layer = quantized_layers.build(index)
        floats = {prefix + p: wb for p, wb in float_weights(float_layer).items()}
        modules = ((prefix + runtime_prefix(n), m) for n, m in layer.named_modules())
        handles = sqnr_hooks(modules, floats, sums)
        try:
            for hidden in _first_tokens(inputs, sqnr_tokens):
                quantized_layers.forward(layer, hidden)
        finally:
            for handle in handles:
                handle.remove()

    def progress(name: str) -> Callable[[int, int], None]:
        return lambda index, total: log(f"{name}: layer {index + 1} of {total}")

    ref = layered_perplexity(reference, token_ids, window, stride, progress("float model"), probe)
    got = layered_perplexity(
        quantized_layers, token_ids, window, stride, progress("quantized model")
    )
    return finish_sqnr(sums, worst_layers, compare_scores(ref, got, agreement_margin))
