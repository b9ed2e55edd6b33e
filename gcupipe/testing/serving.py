"""Tiny models vLLM can actually serve: a tiny checkpoint plus a 256-token byte tokenizer.

vLLM needs a tokenizer (and the chat endpoint a chat template); the tiny checkpoints have a
256-entry vocabulary, so a byte-level tokenizer with no merges fits them exactly: any text
encodes, nothing is downloaded. Owner: serving engineer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

VLLM_CPU_OVERRIDES: dict[str, Any] = {"head_dim": 32}
"""vLLM's CPU attention kernels accept head sizes 32, 64, 80, 96, 112, 128... (not 16)."""


def byte_tokenizer(path: Path | str, chat_template: bool = True) -> Path:
    """Write a byte-level BPE tokenizer with exactly 256 tokens (ids 0-255) into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda char: _byte_of(char))
    vocab = {char: index for index, char in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=byte_chars[1], eos_token=byte_chars[2]
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    if ord(char) in printable:
        return ord(char)
    missing = [b for b in range(256) if b not in printable]
    return missing[ord(char) - 256]


def servable_tiny_model(arch: str, path: Path | str, **overrides: Any) -> Path:
    """`tiny_model(arch, path)` with head sizes vLLM's CPU kernels take, plus the tokenizer."""
    from gcupipe.testing.tiny_models import tiny_model

    settings = {**VLLM_CPU_OVERRIDES, **overrides}
    if arch == "qwen2" and "head_dim" not in overrides:
        settings.pop("head_dim")  # qwen2 derives it: hidden 128 / 4 heads = 32
    model_dir = tiny_model(arch, path, **settings)
    byte_tokenizer(model_dir)
    return model_dir
