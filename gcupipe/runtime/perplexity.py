"""Perplexity, tokenization and greedy generation on any causal LM that maps token ids to logits.

One convention everywhere (shared/DATA.md): windows of 512 tokens advanced by a stride of 512;
every token is scored once, predicted from the tokens before it inside its window, so with
stride == window the first token of each window is not scored. Float and quantized models are
scored on the same token ids, so their perplexities compare directly, and so do their
`PositionScores` (what each model predicted at every scored position, teacher-forced).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gcupipe.errors import StageError, require

LogitsFn = Callable[[Any], Any]
"""Anything that maps a [1, T] LongTensor of token ids to [1, T, vocab] logits."""


@dataclass(frozen=True)
class PositionScores:
    """At every scored position (window order): the log-probability the model gave the true
    next token, its top-1 token and how far that top-1 logit leads the runner-up. Two models
    scored on the same tokens compare position by position (validation/numeric.py)."""

    target_logprob: tuple[float, ...]
    top1: tuple[int, ...]
    margin: tuple[float, ...]


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity and what it was measured on, so two results can be checked as comparable."""

    ppl: float
    nll_sum: float
    scored_tokens: int
    windows: int
    window: int
    stride: int
    seconds: float
    positions: PositionScores

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / max(self.scored_tokens, 1)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "ppl": self.ppl,
            "nll_sum": self.nll_sum,
            "scored_tokens": self.scored_tokens,
            "windows": self.windows,
            "window": self.window,
            "stride": self.stride,
            "seconds": self.seconds,
        }


def windows(num_tokens: int, window: int = 512, stride: int = 512) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: tokens [first_scored, end) are scored in it.

    Mirrors the sliding-window recipe of the transformers perplexity guide: a window scores
    only the tokens no earlier window scored, and never its own first token (nothing predicts it).
    """
    if window < 2 or stride < 1 or stride > window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got {window}, {stride}")
    spans: list[tuple[int, int, int]] = []
    scored_until = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first = max(begin + 1, scored_until)
        if end - begin >= 2 and first < end:
            spans.append((begin, end, first))
        scored_until = end
        if end == num_tokens:
            break
    return spans


def logits_of(model: Any, input_ids: Any) -> Any:
    """Logits from a transformers model, a runtime model or a plain function."""
    out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, tuple | list):
        return out[0]
    return out


class WindowScorer:
    """Accumulates what `perplexity` reports, one window's logits at a time (the whole-model
    and the layer-by-layer evaluators score windows the same way through this)."""

    def __init__(self, token_ids: Sequence[int], window: int, stride: int):
        torch = require("torch", "quant")
        self.ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        self.spans = windows(len(self.ids), window, stride)
        if not self.spans:
            raise StageError(f"perplexity needs at least 2 tokens, got {len(self.ids)}")
        self.window, self.stride = window, stride
        self.started = time.perf_counter()
        self.nll_sum = 0.0
        self.target_logprob: list[float] = []
        self.top1: list[int] = []
        self.margin: list[float] = []

    def add(self, span: tuple[int, int, int], logits: Any) -> int:
        """Score window `span` from its logits [end - begin, vocab]; returns tokens scored."""
        torch = require("torch", "quant")
        begin, end, first = span
        # logits at position t predict token t + 1; log-softmax in (at least) float32
        predicting = logits[first - begin - 1 : end - begin - 1]
        if predicting.dtype != torch.float64:
            predicting = predicting.float()
        log_probs = torch.log_softmax(predicting, dim=-1)
        target = log_probs.gather(1, self.ids[first:end].unsqueeze(1))[:, 0]
        self.nll_sum -= float(target.sum())
        top2 = predicting.topk(min(2, predicting.shape[-1]), dim=-1)
        self.target_logprob += target.tolist()
        self.top1 += top2.indices[:, 0].tolist()
        lead = top2.values[:, 0] - top2.values[:, -1]
        self.margin += lead.tolist()
        return end - first

    def result(self) -> PerplexityResult:
        scored = len(self.target_logprob)
        return PerplexityResult(
            ppl=math.exp(self.nll_sum / scored),
            nll_sum=self.nll_sum,
            scored_tokens=scored,
            windows=len(self.spans),
            window=self.window,
            stride=self.stride,
            seconds=time.perf_counter() - self.started,
            positions=PositionScores(
                tuple(self.target_logprob), tuple(self.top1), tuple(self.margin)
            ),
        )


def perplexity(
    model: Any,
    token_ids: Sequence[int],
    window: int = 512,
    stride: int = 512,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """exp(mean negative log-likelihood) of `token_ids` under `model` (log-softmax in float32,
    float64 for a float64 model), with the per-position scores."""
    torch = require("torch", "quant")
    scorer = WindowScorer(token_ids, window, stride)
    with torch.inference_mode():
        for span in scorer.spans:
            begin, end, _ = span
            scored = scorer.add(span, logits_of(model, scorer.ids[begin:end].unsqueeze(0))[0])
            if on_window is not None:
                on_window(scored)
    return scorer.result()


def greedy_generate(
    model: Any, prompt_ids: Sequence[int], max_new_tokens: int = 16, eos_token_id: int | None = None
) -> list[int]:
    """The new tokens a greedy decoder emits after `prompt_ids` (full re-forward per step: the
    runtime models are stateless, which keeps float and quantized decoding strictly comparable)."""
    torch = require("torch", "quant")
    ids = list(prompt_ids)
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = logits_of(model, torch.as_tensor([ids], dtype=torch.long))[0, -1]
            token = int(torch.argmax(logits.float()))
            new.append(token)
            ids.append(token)
            if eos_token_id is not None and token == eos_token_id:
                break
    return new
