"""Layered numeric validation (models larger than RAM) against whole-model validation."""

from __future__ import annotations

import math

import pytest

from gcupipe.validation import api
from gcupipe.validation.api import (
    ValidationSettings,
    float32_bytes,
    use_layered,
    validate_model_dir,
)

# tiny random models are never confident in the way a trained LM is: their top-1 logit leads
# by 0.01-0.3, so agreement counts positions leading by >= 0.05 (about the top 60%)
SMALL = {
    "eval_tokens": 300,
    "window": 96,
    "stride": 96,
    "agreement_margin": 0.05,
    "sqnr_tokens": 128,
}


def _validate(model, reference, tmp_path, name, **settings):
    return validate_model_dir(
        model,
        reference,
        ValidationSettings(**SMALL, **settings),
        tmp_path / name,
        log=lambda message: None,
    ).report


@pytest.mark.parametrize("fixture", ["good_w8a8_kv", "good_deepseek"])
def test_forced_layered_gives_the_whole_model_ppl_and_agreement(
    fixture, request, tiny_llama, tmp_path
):
    model = request.getfixturevalue(fixture)
    reference = tiny_llama if fixture == "good_w8a8_kv" else model.parent / "src"
    whole = _validate(model, reference, tmp_path, "whole", layered=False)
    layered = _validate(model, reference, tmp_path, "layered", layered=True)
    assert whole.metrics["layered"] is False and layered.metrics["layered"] is True
    assert layered.metrics["ppl_increase"] == pytest.approx(whole.metrics["ppl_increase"], abs=1e-6)
    assert layered.metrics["ppl_float"] == pytest.approx(whole.metrics["ppl_float"], rel=1e-6)
    assert layered.metrics["scored_tokens"] == whole.metrics["scored_tokens"]
    assert layered.metrics["confident_positions"] == whole.metrics["confident_positions"] > 50
    assert layered.metrics["token_agreement"] == pytest.approx(
        whole.metrics["token_agreement"], abs=0.02
    )
    assert 0.8 <= layered.metrics["token_agreement"] <= 1.0
    # every quantized linear gets an SQNR in both modes (layered: on the float model's inputs)
    assert set(layered.metrics["sqnr_db"]) == set(whole.metrics["sqnr_db"])
    assert all(v > 10 for v in layered.metrics["sqnr_db"].values())
    gates = {g.rule: g for g in layered.gates}
    assert gates["token-agreement"].status != "skip"
    assert gates["token-agreement"].metrics["agreement_margin"] == 0.05
    markdown = (tmp_path / "layered" / "validation.md").read_text()
    assert "positions where float leads by >= 0.05" in markdown


def test_a_damaged_model_fails_the_layered_gates(good_w8a8_kv, tiny_llama, broken, tmp_path):
    from safetensors.torch import load_file, save_file

    damaged = broken(good_w8a8_kv)
    for file in damaged.glob("*.safetensors"):
        tensors = load_file(str(file))
        for name in tensors:
            if name.endswith("mlp.down_proj.weight_scale"):
                tensors[name] = tensors[name] * 8
        save_file(tensors, str(file), metadata={"format": "pt"})
    report = _validate(damaged, tiny_llama, tmp_path, "bad", layered=True, min_sqnr_db=20)
    assert {"token-agreement", "layer-sqnr"} <= {r.rule for r in report.failures}
    assert "down_proj" in report.metrics["worst_layers"][0]


def test_auto_mode_goes_layered_when_the_float32_reference_exceeds_the_ram_share(
    tiny_llama, monkeypatch
):
    from safetensors.torch import load_file

    elements = sum(t.numel() for t in load_file(str(tiny_llama / "model.safetensors")).values())
    assert float32_bytes(tiny_llama) == 4 * elements
    needed = 4 * elements
    share = api.LAYERED_RAM_SHARE
    monkeypatch.setattr(api, "_physical_memory_bytes", lambda: math.ceil(needed / share) + 1)
    assert not use_layered(ValidationSettings(), tiny_llama, log=lambda m: None)
    assert use_layered(ValidationSettings(layered=True), tiny_llama, log=lambda m: None)
    monkeypatch.setattr(api, "_physical_memory_bytes", lambda: int(needed / share) - 1)
    assert use_layered(ValidationSettings(), tiny_llama, log=lambda m: None)
    assert not use_layered(ValidationSettings(layered=False), tiny_llama, log=lambda m: None)
