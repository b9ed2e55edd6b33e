"""What loads where, asked of the profiles themselves: for every target x method x format, the
serve flags or the reason its loaders refuse it, for a dense model and a MoE + MLA one
(DeepSeek-V2's shape). The README's table and `gcupipe targets` print this; nothing here is
written by hand."""

from __future__ import annotations

from dataclasses import dataclass

from gcupipe.errors import StageError
from gcupipe.formats.format import Combination, Format
from gcupipe.formats.registry import FORMATS
from gcupipe.quant.methods import METHODS
from gcupipe.targets.base import ModelFacts, Target
from gcupipe.targets.registry import TARGETS

DENSE = ModelFacts("llama", moe=False, mla=False, tied_embeddings=False, dtype="bfloat16")
MOE = ModelFacts("deepseek_v2", moe=True, mla=True, tied_embeddings=False, dtype="bfloat16")
KV_ROW = "w8a8 + int8 KV"
ROWS = ("w8a8_dynamic", "w8a8", "w8a16", "w4a16", "gptq", "awq", KV_ROW)
BUILT_IN_FORMATS = ("modelslim", "gcu", "compressed-tensors")
FIRST = ("gcu", "ascend", "cuda", "cpu")  # the product's own first, plugins' after


def target_names() -> list[str]:
    names = TARGETS.names()
    return [n for n in FIRST if n in names] + [n for n in names if n not in FIRST]


@dataclass(frozen=True)
class Cell:
    dense: str
    moe: str

    def markdown(self) -> str:
        return self.dense if self.moe == self.dense else f"{self.dense}; MoE: {self.moe}"


def combination(row: str) -> Combination:
    """The method's defaults as the quantize stage takes them (KV_ROW: static W8A8 plus C8)."""
    method = METHODS.get("w8a8" if row == KV_ROW else row)
    return Combination(
        method.name,
        method.bits,
        method.group_size,
        True,
        method.activation,
        kv_cache=row == KV_ROW,
    )


def verdict(target: Target, fmt: Format, combo: Combination, facts: ModelFacts) -> str:
    """`--quantization X` (plus the KV flag), "auto-detected", or "no: <the loader's reason>"."""
    problems = fmt.problems(combo) + target.problems(fmt, combo, facts)
    if problems:
        return f"no: {problems[0][1].split(';')[0]}"
    try:
        flag = target.planned_quantization(fmt, combo, facts.moe)
    except StageError as exc:
        return f"no: {exc}"
    words = [
        "auto-detected" if flag is None or flag.value is None else f"`--quantization {flag.value}`"
    ]
    kv = target.kv_cache_dtype() if combo.kv_cache else None
    if kv:
        words.append(f"`--kv-cache-dtype {kv}`")
    elif combo.kv_cache:
        words.append("C8 from the description")
    return " ".join(words)


def support_matrix() -> dict[tuple[str, str, str], Cell]:
    """(target, row, format) -> what its loaders do with it."""
    cells = {}
    for target_name in target_names():
        target = TARGETS.get(target_name)
        for row in ROWS:
            combo = combination(row)
            for fmt_name in BUILT_IN_FORMATS:
                fmt = FORMATS.get(fmt_name)
                cells[target_name, row, fmt_name] = Cell(
                    verdict(target, fmt, combo, DENSE), verdict(target, fmt, combo, MOE)
                )
    return cells


def support_markdown() -> str:
    """One table per target: methods down, formats across."""
    cells = support_matrix()
    parts = []
    for target_name in target_names():
        target = TARGETS.get(target_name)
        parts.append(f"**{target_name}**: {target.summary} ({target.sources})\n")
        parts.append(f"| method | {' | '.join(BUILT_IN_FORMATS)} |")
        parts.append("|---" * (len(BUILT_IN_FORMATS) + 1) + "|")
        for row in ROWS:
            line = [cells[target_name, row, f].markdown() for f in BUILT_IN_FORMATS]
            parts.append(f"| {row} | {' | '.join(line)} |")
        parts.append("")
    return "\n".join(parts)
