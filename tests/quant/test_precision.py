"""The dtype of calibration forwards: bf16 matmuls where native, fp32 everything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gcupipe.quant.precision import calibration_dtype, native_bf16


def test_settings_resolve_to_dtypes():
    assert calibration_dtype("float32", "cpu") is torch.float32
    assert calibration_dtype("bfloat16", "cpu") is torch.bfloat16
    expected = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert calibration_dtype("auto", "cpu") is expected


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gcupipe.testing.tiny_models import tiny_model

    return tiny_model("llama", tmp_path_factory.mktemp("llama"))


def gptq_logits(model: Path, out: Path, dtype: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of `model` quantized by GPTQ (w4 g32) with calibration forwards in `dtype`."""
    from gcupipe.formats.modelslim_io import ModelslimWriter
    from gcupipe.formats.registry import read_quantized
    from gcupipe.quant.gptq import GPTQMethod
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.streaming import quantize_model
    from gcupipe.runtime.model import build_model, load_config

    out.mkdir()
    writer = ModelslimWriter(out, model, json.loads((model / "config.json").read_text()), "gptq")
    spec = LayerSpec(bits=4, group_size=32, symmetric=True)
    tokens = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    resolve = lambda name: None if "lm_head" in name or "embed" in name else spec  # noqa: E731
    quantize_model(model, writer, GPTQMethod(), resolve, tokens, compute_dtype=dtype, log=print)
    writer.finish()
    ckpt = read_quantized(out)
    with torch.no_grad():
        return build_model(load_config(out), ckpt.float_tensors, ckpt.linears)(ids).logits


def test_bf16_calibration_quantizes_as_well_as_fp32(tiny_llama, tmp_path):
    """bf16 matmuls round the activations GPTQ's Hessians are built from by ~0.4%: the model
    it makes is as close to the float model as the one fp32 calibration makes."""
    from gcupipe.runtime.model import load_float_model

    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = load_float_model(tiny_llama)(ids).logits
    errors = {
        dtype: float((gptq_logits(tiny_llama, tmp_path / dtype, dtype, ids) - reference).norm())
        / float(reference.norm())
        for dtype in ("float32", "bfloat16")
    }
    assert errors["bfloat16"] < 1.2 * errors["float32"], errors
