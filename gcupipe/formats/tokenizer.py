"""A model directory's tokenizer: which files make one, loading it, and text to token ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gcupipe.errors import StageError, require
from gcupipe.formats.modeldir import ModelDir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def tokenizer_dir(*candidates: Path | None) -> Path | None:
    """The first directory that has tokenizer files (quantized dirs copy them; tiny test
    models have none)."""
    for candidate in candidates:
        if candidate is not None and any((candidate / f).is_file() for f in TOKENIZER_FILES):
            return candidate
    return None


def has_chat_template(md: ModelDir) -> bool:
    """Whether the tokenizer carries a chat template (a file of its own, or in its config)."""
    if (md.path / "chat_template.jinja").is_file():
        return True
    return bool((md.json_file("tokenizer_config.json") or {}).get("chat_template"))


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


def text_token_ids(
    text: str,
    tokenizer_from: Path | None,
    vocab_size: int,
    max_tokens: int | None = None,
    special_tokens: bool = True,
) -> list[int]:
    """Token ids of `text` with the model's tokenizer: as a plain transformers evaluation makes
    them (special tokens as the tokenizer's defaults say), or without special tokens for running
    text (calibration windows). Without a tokenizer, the UTF-8 bytes modulo the vocabulary, so
    tiny test models still get a deterministic text. Cut to the first `max_tokens`."""
    if tokenizer_from is None:
        ids = [b % vocab_size for b in text.encode("utf-8")]
    else:
        tokenizer = load_tokenizer(tokenizer_from)
        ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    return ids[:max_tokens] if max_tokens is not None else ids
