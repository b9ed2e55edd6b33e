"""`calibration:` of the quantize stage: where the text comes from (a file, jsonl, a hub
dataset) and how many windows of how many tokens are drawn from it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gcupipe.errors import RecipeError, StageError
from gcupipe.hub.dataset_files import json_lines_texts
from gcupipe.hub.datasets import fetch_dataset_texts, parse_dataset_spec
from gcupipe.quant.precision import CalibrationDtype

if TYPE_CHECKING:
    import torch


class CalibrationConfig(BaseModel):
    """`calibration:` of the quantize stage. Exactly one source may be given; none means the
    built-in fallback is NOT used: methods that need calibration then fail at lint time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text_file: Path | None = Field(default=None, description="Plain UTF-8 text file.")
    jsonl: Path | None = Field(
        default=None, description="JSON-lines file; each line's `text_field` is one document."
    )
    dataset: str | None = Field(
        default=None,
        description="Hub dataset, 'modelscope:owner/name' or 'hf:owner/name', fetched with the "
        "hub's own client (endpoint, token and cache as for the download stage). Its split's "
        ".jsonl/.json/.txt files are read (.parquet when pyarrow is installed).",
    )
    dataset_revision: str | None = Field(
        default=None,
        description="Branch, tag or commit of the hub dataset. Default: master on ModelScope, "
        "main on Hugging Face. A commit already in the cache is used without any request.",
    )
    dataset_offline: bool = Field(
        default=False,
        description="Read the hub dataset from the cache only, with no network request "
        "($HF_HUB_OFFLINE=1 also turns this on for Hugging Face).",
    )
    split: str = Field(
        default="train",
        description="Dataset split (hub datasets): the data files whose path has this word "
        "(data/train-00000-of-00001.jsonl, train.jsonl, train/part.txt).",
    )
    text_field: str = Field(default="text", description="Field holding the text (jsonl, hub).")
    samples: int = Field(default=64, gt=0, description="Number of calibration sequences.")
    seq_len: int = Field(default=256, gt=1, description="Tokens per calibration sequence.")
    seed: int = Field(default=0, description="Seed of the window offsets.")
    dtype: CalibrationDtype = Field(
        default="auto",
        description="What the calibration forwards multiply in: auto = bfloat16 where the "
        "device does it natively (CUDA; a CPU with AVX-512 BF16 or AMX), else float32. Weights, "
        "norms and the residual stream stay float32 either way.",
    )

    @field_validator("dataset")
    @classmethod
    def _dataset_names_its_hub(cls, spec: str | None) -> str | None:
        if spec is not None:
            try:
                parse_dataset_spec(spec)
            except RecipeError as exc:
                raise ValueError(exc.message) from exc
        return spec

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        given = [n for n in ("text_file", "jsonl", "dataset") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one calibration source, not {' and '.join(given)}")
        if self.dataset is None and (self.dataset_revision or self.dataset_offline):
            raise ValueError("dataset_revision and dataset_offline are for calibration.dataset")
        return self

    @property
    def has_source(self) -> bool:
        return any(getattr(self, n) is not None for n in ("text_file", "jsonl", "dataset"))


def load_text(config: CalibrationConfig, cache_dir: Path | None = None) -> str:
    """The calibration text of a spec (documents joined by blank lines)."""
    if config.text_file is not None:
        if not config.text_file.is_file():
            raise StageError(f"calibration text_file {config.text_file} does not exist")
        return config.text_file.read_text(encoding="utf-8", errors="replace")
    if config.jsonl is not None:
        if not config.jsonl.is_file():
            raise StageError(f"calibration jsonl {config.jsonl} does not exist")
        text = config.jsonl.read_text(encoding="utf-8")
        return "\n\n".join(json_lines_texts(text, str(config.jsonl), config.text_field))
    if config.dataset is not None:
        return _hub_dataset_text(config, cache_dir)
    raise StageError("no calibration source: set calibration.text_file, jsonl or dataset")


def _hub_dataset_text(config: CalibrationConfig, cache_dir: Path | None) -> str:
    assert config.dataset is not None
    texts = fetch_dataset_texts(
        config.dataset,
        split=config.split,
        text_field=config.text_field,
        cache_dir=cache_dir,
        offline=config.dataset_offline,
        revision=config.dataset_revision,
    )
    return "\n\n".join(texts)


def calibration_tokens(
    config: CalibrationConfig, model_dir: Path, vocab_size: int, cache_dir: Path | None = None
) -> torch.Tensor:
    """[samples, seq_len] token ids of the spec's text, tokenized as running text by the
    model's own tokenizer (UTF-8 bytes for a model without one)."""
    from gcupipe.formats.tokenizer import text_token_ids, tokenizer_dir
    from gcupipe.quant.calibration import calibration_batches

    text = load_text(config, cache_dir)
    ids = text_token_ids(text, tokenizer_dir(model_dir), vocab_size, special_tokens=False)
    return calibration_batches(ids, config.samples, config.seq_len, config.seed)
