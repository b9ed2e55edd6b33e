"""What a model directory must carry besides weights to be usable where it is published: the
tokenizer, its chat template, generation_config.json, the remote code config.json's and the
tokenizer's `auto_map` name, and the license.

The float source says what exists: a file it has that the bundle lacks was left behind (the
breakage users of every quantization tool report at publish time). Without a source only what
the bundle itself references can be checked; `require_tokenizer` (publish) also refuses a
bundle with no tokenizer at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gcupipe.formats.modeldir import ModelDir
from gcupipe.formats.results import Finding
from gcupipe.formats.tokenizer import TOKENIZER_FILES, has_chat_template

TOKENIZER_SIDE_FILES = (
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
LICENSE_NAMES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING")
GENERATION_CONFIG = "generation_config.json"
COPY_FIX = "copy it from the source model unchanged (the quantize stage copies side files)"


def remote_code_files(md: ModelDir) -> list[str]:
    """The .py files config.json's and tokenizer_config.json's `auto_map` name."""
    names: set[str] = set()
    for document in (md.config or {}, md.json_file("tokenizer_config.json") or {}):
        for value in _auto_map_values(document.get("auto_map")):
            if "--" in value:  # "other/repo--module.Class": code from another repository
                continue
            module = value.rsplit(".", 1)[0]
            if module:
                names.add(module.replace(".", "/") + ".py")
    return sorted(names)


def _auto_map_values(auto_map: Any) -> list[str]:
    if isinstance(auto_map, dict):
        return [v for value in auto_map.values() for v in _auto_map_values(value)]
    if isinstance(auto_map, list | tuple):
        return [v for value in auto_map for v in _auto_map_values(value)]
    return [auto_map] if isinstance(auto_map, str) else []


def missing_files(
    md: ModelDir, source: Path | None, require_tokenizer: bool = False
) -> list[tuple[str, str]]:
    """(file name, why it is needed) for each file the bundle lacks, in a fixed order."""
    missing: list[tuple[str, str]] = []

    def lacks(name: str) -> bool:
        return not (md.path / name).is_file()

    if source is not None:
        for name in (*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES):
            if (source / name).is_file() and lacks(name):
                missing.append((name, "the source model's tokenizer has it"))
        if has_chat_template(ModelDir(source)) and not has_chat_template(md):
            missing.append(("chat_template", "the source model has a chat template"))
        if (source / GENERATION_CONFIG).is_file() and lacks(GENERATION_CONFIG):
            missing.append((GENERATION_CONFIG, "the source model has it (sampling defaults)"))
        for name in LICENSE_NAMES:
            if (source / name).is_file() and lacks(name):
                missing.append((name, "the source model's license"))
    reported = {name for name, _ in missing}
    if (
        require_tokenizer
        and not reported & set(TOKENIZER_FILES)
        and not any((md.path / f).is_file() for f in TOKENIZER_FILES)
    ):
        missing.append(("tokenizer.json", "no tokenizer at all: vLLM cannot serve the model"))
    for name in remote_code_files(md):
        if lacks(name):
            missing.append((name, "auto_map names it (trust_remote_code loads it)"))
    return missing


def bundle_findings(
    md: ModelDir, source: Path | None, require_tokenizer: bool = False
) -> list[Finding]:
    return [
        Finding(f"{name} is missing: {why}", COPY_FIX)
        for name, why in missing_files(md, source, require_tokenizer)
    ]
