"""The real model and text helpers give what DATA.md promises, and build each only once."""

from __future__ import annotations

import json

import pytest

from gcupipe.testing import real_data


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GCUPIPE_TEST_CACHE", str(tmp_path / "cache"))
    assert real_data.cache_root() == tmp_path / "cache"
    assert (tmp_path / "cache").is_dir()


def test_gguf_file_is_found_without_importing_the_llm_plugin():
    path = real_data.smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


@pytest.mark.slow
def test_botchan_split_is_30_70_without_gutenberg_boilerplate():
    calibration, evaluation = real_data.botchan_text()
    lines_calibration = calibration.splitlines()
    lines_eval = evaluation.splitlines()
    total = len(lines_calibration) + len(lines_eval)
    assert len(lines_calibration) == int(total * 0.3)
    assert "*** START OF" not in calibration + evaluation
    assert "End of Project Gutenberg" not in evaluation
    assert "BOTCHAN" in calibration
    assert real_data.botchan_text() == (calibration, evaluation)


@pytest.mark.slow
def test_smollm2_checkpoint_is_a_plain_float32_llama():
    directory = real_data.smollm2_checkpoint()
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert "quantization_config" not in config
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer.json").is_file()
    assert real_data.smollm2_checkpoint() == directory


@pytest.mark.slow
def test_smollm2_checkpoint_knows_the_capital_of_france():
    """The converted weights are a working model, not just the right shapes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = real_data.smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
