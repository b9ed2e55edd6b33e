"""Calibration specs turn into deterministic token batches; bad specs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from gcupipe.errors import StageError
from gcupipe.stages.calibration import CalibrationConfig, calibration_tokens, load_text


def test_text_file_batches_are_deterministic_windows(tmp_path):
    (tmp_path / "c.txt").write_text("abcdefghij" * 20)
    config = CalibrationConfig(text_file=tmp_path / "c.txt", samples=5, seq_len=16, seed=3)
    first = calibration_tokens(config, tmp_path, vocab_size=256)  # no tokenizer: UTF-8 bytes
    assert first.shape == (5, 16) and first.dtype == torch.long
    assert torch.equal(first, calibration_tokens(config, tmp_path, vocab_size=256))
    text = (tmp_path / "c.txt").read_bytes()
    for row in first.tolist():  # every sample is a real window of the text
        assert bytes(row) in text
    other = calibration_tokens(config.model_copy(update={"seed": 4}), tmp_path, 256)
    assert not torch.equal(first, other)


def test_jsonl_reads_the_text_field_and_names_bad_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert load_text(CalibrationConfig(jsonl=path)) == "hello\n\nworld"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(StageError, match=r"c.jsonl:1: .*'text'"):
        load_text(CalibrationConfig(jsonl=path))


def test_short_text_is_repeated_and_sources_are_exclusive(tmp_path):
    (tmp_path / "c.txt").write_text("tiny")
    batches = calibration_tokens(
        CalibrationConfig(text_file=tmp_path / "c.txt", samples=2, seq_len=32), tmp_path, 256
    )
    assert batches.shape == (2, 32)
    with pytest.raises(ValidationError, match="one calibration source"):
        CalibrationConfig(text_file=tmp_path / "c.txt", jsonl=tmp_path / "c.txt")
    with pytest.raises(StageError, match="does not exist"):
        load_text(CalibrationConfig(text_file=tmp_path / "missing.txt"))
