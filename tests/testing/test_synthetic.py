"""The synthetic DeepSeek-V2-Lite: the published config, tensor names, sizes and shard cut, and
weights that keep a forward pass finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from gcupipe.testing.synthetic import (  # noqa: E402
    DEEPSEEK_V2_LITE,
    SHAPES,
    _shards,
    tensor_plan,
)


def test_the_full_plan_is_the_published_checkpoint() -> None:
    """5,291 tensors, 31,412,968,448 bytes of bf16 (15,706,484,224 parameters), four shards
    of at most 8 GiB as the published model.safetensors.index.json has."""
    plan = tensor_plan(DEEPSEEK_V2_LITE)
    assert len(plan) == 5291
    assert 2 * sum(math.prod(shape) for _, shape in plan) == 31_412_968_448
    shapes = dict(plan)
    assert shapes["model.embed_tokens.weight"] == (102400, 2048)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (10944, 2048)
    assert shapes["model.layers.1.mlp.experts.63.down_proj.weight"] == (2048, 1408)
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (2816, 2048)
    assert shapes["model.layers.26.self_attn.q_proj.weight"] == (3072, 2048)  # no q LoRA
    assert shapes["model.layers.26.self_attn.kv_a_proj_with_mqa.weight"] == (576, 2048)
    assert shapes["model.layers.26.self_attn.kv_b_proj.weight"] == (4096, 512)
    assert "model.layers.0.mlp.experts.0.up_proj.weight" not in shapes  # layer 0 is dense
    shards = _shards(plan, SHAPES["deepseek-v2-lite"].max_shard_bytes, itemsize=2)
    assert len(shards) == 4
    assert all(2 * sum(math.prod(s) for _, s in shard) <= 8 << 30 for shard in shards)


def test_a_short_model_of_the_same_width_runs_finite(tmp_path: Path) -> None:
    """Two layers (the dense one and one MoE layer) written through the command line, read by
    transformers' own DeepSeek-V2 class: every tensor where the plan says, bf16, and logits of
    a plausible scale."""
    out = tmp_path / "dsv2"
    command = [sys.executable, "-m", "gcupipe.testing.synthetic", "deepseek-v2-lite", str(out)]
    done = subprocess.run([*command, "--layers", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in DEEPSEEK_V2_LITE.items() if k != "num_hidden_layers"
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {name for name, _ in tensor_plan(config)}
    assert not list(out.glob(".*partial"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == config["bos_token_id"]
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all()
    assert 0.1 < float(logits.std()) < 100
    bad = subprocess.run([*command, "--layers", "99"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--layers must be 1..27" in bad.stderr
