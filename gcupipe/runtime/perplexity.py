"""Perplexity, tokenization and greedy generation on any causal LM that maps token ids to logits.

One convention everywhere (shared/DATA.md): windows of 512 tokens advanced by a stride of 512;
every token is scored once, predicted from the tokens before it inside its window, so with
stride == window the first token of each window is not scored. Float and quantized models are
scored on the same token ids, so their perplexities compare directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.errors import StageError, require

LogitsFn = Callable[[Any], Any]
"""Anything that maps a [1, T] LongTensor of token ids to [1, T, vocab] logits."""


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


def load_tokenizer(model_dir: Path | str) -> Any:
    """The model directory's own tokenizer (transformers AutoTokenizer)."""
    transformers = require("transformers", "quant")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # transformers raises many kinds for a missing/odd tokenizer
        raise StageError(
            f"cannot load a tokenizer from {model_dir}: {exc}".splitlines()[0]
            + " (copy the source model's tokenizer files into it, or pass token ids)"
        ) from exc


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of `text` the way a plain transformers evaluation makes them (special tokens
    added as the tokenizer's defaults say), optionally cut to the first `max_tokens`."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids[:max_tokens] if max_tokens is not None else ids


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


def perplexity(
    model: Any,
    token_ids: Sequence[int],
    window: int = 512,
    stride: int = 512,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """exp(mean negative log-likelihood) of `token_ids` under `model`, in fp32 log-softmax."""
    torch = require("torch", "quant")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    spans = windows(len(ids), window, stride)
    if not spans:
        raise StageError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    started = time.perf_counter()
    nll_sum = 0.0
    scored = 0
    with torch.inference_mode():
        for begin, end, first in spans:
            logits = logits_of(model, ids[begin:end].unsqueeze(0))[0]
            # logits at position t predict token t + 1
            predicting = logits[first - begin - 1 : end - begin - 1].float()
            targets = ids[first:end]
            log_probs = torch.log_softmax(predicting, dim=-1)
            nll_sum -= float(log_probs.gather(1, targets.unsqueeze(1)).sum())
            scored += end - first
            if on_window is not None:
                on_window(end - first)
    return PerplexityResult(
        ppl=math.exp(nll_sum / scored),
        nll_sum=nll_sum,
        scored_tokens=scored,
        windows=len(spans),
        window=window,
        stride=stride,
        seconds=time.perf_counter() - started,
    )


def greedy_generate(model: Any, prompt_ids: Sequence[int], max_new_tokens: int = 16,
                    eos_token_id: int | None = None) -> list[int]:
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


def teacher_forced_agreement(model: Any, prompt_ids: Sequence[int],
                             reference_new: Sequence[int]) -> float:
    """Share of the reference's greedy tokens that `model` also picks when fed the reference's
    own prefix at each step. One forward per prompt, and one early divergence does not make
    every later position count as a miss (free-running agreement would)."""
    torch = require("torch", "quant")
    if not reference_new:
        return 1.0
    sequence = list(prompt_ids) + list(reference_new)
    with torch.inference_mode():
        logits = logits_of(model, torch.as_tensor([sequence[:-1]], dtype=torch.long))[0]
    picks = torch.argmax(logits[len(prompt_ids) - 1 :].float(), dim=-1).tolist()
    same = sum(1 for a, b in zip(picks, reference_new, strict=True) if a == b)
    return same / len(reference_new)
