"""The seed's flow on the real SmolLM2-135M: download (gguf) -> quantize w8a8_dynamic modelslim ->
validate -> serve online with quantization gcu; and vLLM's greedy tokens through the plugin agree
with the reference runtime's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from gcupipe.engine import Selection, run_recipe  # noqa: E402
from gcupipe.recipe import load_recipe  # noqa: E402

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
MIN_AGREEMENT = 0.95


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):  # type: ignore[no-untyped-def]
    from gcupipe.testing.real_data import smollm2_gguf_path

    root = tmp_path_factory.mktemp("smollm2-e2e")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
version: 1
name: smollm2-w8a8-dynamic
stages:
  download:
    uses: download
    with: {{source: gguf, path: "{smollm2_gguf_path()}"}}
  quantize:
    uses: quantize
    with:
      model: ${{stages.download.outputs.model_dir}}
      method: w8a8_dynamic
      format: modelslim
  validate:
    uses: validate
    with: {{model: "${{stages.quantize.outputs.model_dir}}", numeric: false}}
  serve:
    uses: serve
    with:
      model: ${{stages.validate.outputs.model_dir}}
      mode: online
      served_model_name: smollm2-w8a8
      max_model_len: 256
      max_tokens: 8
      prompts: ["The capital of France is"]
""")
    result = run_recipe(load_recipe(recipe, [], environ=dict(os.environ)), root / "run",
                        Selection())
    assert result.outcome == "ok", result.error
    return result


def test_seed_flow_serves_paris(pipeline) -> None:  # type: ignore[no-untyped-def]
    serve = pipeline.outputs("serve")
    assert serve["quantization"] == "gcu"
    assert "--quantization gcu" in serve["command"]
    checks = json.loads(Path(serve["checks_file"]).read_text())
    assert all(check["ok"] for check in checks), checks
    completion = next(c for c in checks if c["endpoint"] == "/v1/completions")
    assert "Paris" in completion["text"]
    assert pipeline.outputs("quantize")["format"] == "modelslim"
    assert pipeline.outputs("validate")["passed"]


def _w8a16_export(float_dir: Path, out: Path) -> Path:
    """SmolLM2 W8A16 per channel, through the real modelslim writer."""
    from safetensors.torch import load_file

    from gcupipe.formats.modelslim import ModelslimWriter
    from gcupipe.quant.methods import LayerSpec
    from gcupipe.quant.rtn import rtn_linear

    out.mkdir(parents=True)
    writer = ModelslimWriter(out, float_dir, json.loads((float_dir / "config.json").read_text()),
                             "w8a16")
    for file in sorted(float_dir.glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if ".layers." in name and name.endswith("proj.weight"):
                writer.add_linear(name.removesuffix(".weight"), rtn_linear(tensor, None,
                                                                           LayerSpec(bits=8)))
            else:
                writer.add_float(name, tensor)
    writer.finish()
    return out


def _teacher_forced(model, sequences: list[list[int]], prompt_lengths: list[int],
                    noise: float = 0.0) -> list[list[int]]:
    """The reference's greedy choice at every generated position of `sequences` (one forward
    each). With `noise`, every decoder layer's input norm output is scaled by (1 + noise * N(0,1)):
    float-rounding-sized differences, to measure how chaotic the model's greedy choices are."""
    import torch

    from gcupipe.runtime.perplexity import logits_of

    hooks = []
    if noise:
        torch.manual_seed(0)
        hooks = [module.register_forward_hook(
                     lambda _m, _a, out: out * (1 + noise * torch.randn_like(out)))
                 for name, module in model.named_modules() if name.endswith("input_layernorm")]
    try:
        with torch.inference_mode():
            return [logits_of(model, torch.tensor([seq]))[0, length - 1:-1].argmax(-1).tolist()
                    for seq, length in zip(sequences, prompt_lengths, strict=True)]
    finally:
        for hook in hooks:
            hook.remove()


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True)
             for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_greedy_tokens_agree_with_the_reference_runtime(pipeline, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """vLLM's greedy tokens are checked step by step against the reference runtime's choice on
    the same prefix (teacher forcing): 100% means identical greedy continuations.

    W8A16 must reach 95%. W8A8_DYNAMIC quantizes activations per token, and on SmolLM2 that is
    chaotic: a 1e-6 relative change of the norm outputs inside the runtime itself flips ~10% of
    greedy choices (measured: 89% agreement with itself, logits moving by up to 6). No engine
    with different float kernels can beat that floor, so W8A8_DYNAMIC must reach the lower of
    95% and the runtime's own agreement under that noise (less 3 points, 4 of 128 tokens).
    benchmarks/greedy_stability.py shows the same with a plain float change: the runtime in
    float64 picks the float32 runtime's greedy token on only 94.5% of these positions."""
    from gcupipe.runtime.load import load_model
    from gcupipe.runtime.perplexity import load_tokenizer
    from gcupipe.serving.platform import Platform, platform_env
    from gcupipe.serving.runner import offline_spec, run_offline_spec
    from gcupipe.testing.real_data import GREEDY_PROMPTS

    w8a8 = Path(pipeline.outputs("quantize")["model_dir"])
    w8a16 = _w8a16_export(Path(pipeline.outputs("download")["model_dir"]), tmp_path / "w8a16")
    tokenizer = load_tokenizer(w8a8)
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in GREEDY_PROMPTS]
    jobs = [{"llm": {"model": str(model), "quantization": "gcu", "dtype": "float32",
                     "enforce_eager": True, "max_model_len": 128},
             "prompts": prompt_ids, "max_tokens": NEW_TOKENS, "ignore_eos": True,
             "output": str(tmp_path / f"{name}.jsonl")}
            for name, model in (("w8a8_dynamic", w8a8), ("w8a16", w8a16))]
    env = {**os.environ, **platform_env(Platform.CPU, tmp_path, kv_cache_space_gib=1)}
    run_offline_spec(offline_spec(jobs, tmp_path / "summary.json"), tmp_path, env,
                     tmp_path / "vllm.log", timeout_s=600)
    lengths = [len(ids) for ids in prompt_ids]
    for (name, model), job in zip((("w8a8_dynamic", w8a8), ("w8a16", w8a16)), jobs, strict=True):
        served = [json.loads(line)["token_ids"] for line in
                  Path(job["output"]).read_text().splitlines()]
        sequences = [ids + tokens for ids, tokens in zip(prompt_ids, served, strict=True)]
        runtime = load_model(model).model
        reference = _teacher_forced(runtime, sequences, lengths)
        agreement = _agreement(served, reference)
        required = MIN_AGREEMENT
        if name == "w8a8_dynamic":
            floor = _agreement(reference, _teacher_forced(runtime, sequences, lengths, 1e-6))
            required = min(MIN_AGREEMENT, floor) - 0.03
        assert agreement >= required, (name, agreement, required)
