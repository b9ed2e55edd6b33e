"""Calibration windows: token batches drawn deterministically from a tokenized text.

The same token ids and seed give the same [samples, seq_len] batch. Samples are windows of
`seq_len` tokens at seeded random offsets of the text (the GPTQ/llm-compressor convention); a
text shorter than one window is repeated. Where the text comes from is the quantize stage's
business (stages/calibration.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gcupipe.errors import StageError

if TYPE_CHECKING:
    import torch


def calibration_batches(ids: Sequence[int], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[samples, seq_len] int64 windows of `ids` at offsets drawn from `seed`."""
    import torch

    ids = list(ids)
    if len(ids) < 2:
        raise StageError("the calibration text has fewer than 2 tokens")
    while len(ids) <= seq_len:
        ids = ids + ids
    tokens = torch.tensor(ids, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (samples,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
