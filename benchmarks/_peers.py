"""llmcompressor, the peer the accuracy benchmarks compare with, run on gcupipe's own tokens.

llmcompressor pins a transformers older than the project's, so it lives in a benchmark-only
venv (.cache/bench-venv, created on first use). `run_peer` hands it the calibration and eval
token ids through a file; this module, run by the venv's python, quantizes with the named
preset, scores the eval tokens with gcupipe's perplexity (same windows) and answers in JSON.

    python benchmarks/_llmcompressor.py REQUEST.pt ANSWER.json     # inside the bench venv
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_VENV = REPO / ".cache" / "bench-venv"
# torch first, from the CPU wheel this machine's pip constraints allow, so that nothing pulls a
# CUDA torch; llmcompressor 0.14.0.1 then pins transformers <= 5.17 (5.17.0 resolves) inside
# the venv only. The project's own venv keeps its transformers.
BENCH_REQUIREMENTS = (["torch==2.13.0"], ["llmcompressor==0.14.0.1"])
PRESETS = ("gptq-w4-g64-sym", "w8a8")


def ensure_bench_venv() -> Path:
    """The python of the llmcompressor venv, created (python3 -m venv + pip) when missing."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".gcupipe-ready"
    if stamp.is_file():
        return python
    print(f"creating the llmcompressor benchmark venv at {BENCH_VENV} (a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    for requirement in BENCH_REQUIREMENTS:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirement], check=True)
    check = "import torch, llmcompressor; assert '+cu' not in torch.__version__, torch.__version__"
    subprocess.run([str(python), "-c", check], check=True)
    stamp.write_text(" ".join(r for group in BENCH_REQUIREMENTS for r in group) + "\n")
    return python


def calibration_tokens(model_dir: Path, calib_text: str, samples: int, seq_len: int) -> Any:
    """[samples, seq_len] token ids, drawn the way the quantize stage draws them."""
    from gcupipe.stages.calibration import CalibrationConfig, calibration_tokens

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "calibration.txt"
        text_file.write_text(calib_text)
        config = CalibrationConfig(text_file=text_file, samples=samples, seq_len=seq_len)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        return calibration_tokens(config, model_dir, vocab)


def run_peer(
    preset: str, model_dir: Path, tokens: Any, eval_ids: list[int], work: Path
) -> dict[str, Any]:
    """{ppl, quantize_s, quantize_cpu_s, eval_s, scored_tokens} of llmcompressor's `preset`."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {PRESETS}")
    python = ensure_bench_venv()
    request, answer = work / f"peer-{preset}.pt", work / f"peer-{preset}.json"
    job = {"preset": preset, "calibration": tokens, "eval_ids": eval_ids}
    torch.save({**job, "model_dir": str(model_dir)}, request)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [str(python), str(Path(__file__).resolve()), str(request), str(answer)], check=True, env=env
    )
    return json.loads(answer.read_text())  # type: ignore[no-any-return]


def _recipe(preset: str) -> Any:
    if preset == "w8a8":  # int8 per-channel weights, int8 per-token dynamic activations
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    from llmcompressor.modifiers.gptq import GPTQModifier

    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": 64,
    }
    return GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]
    )


def _worker(request_path: str, answer_path: str) -> None:
    """Inside the bench venv: oneshot with the preset, then gcupipe's perplexity."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from gcupipe.runtime.perplexity import perplexity

    request = torch.load(request_path)
    tokens = request["calibration"]
    model = AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_dict(
        {"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()}
    )
    started, cpu_started = time.perf_counter(), time.process_time()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=_recipe(request["preset"]),
        num_calibration_samples=int(tokens.shape[0]),
        max_seq_length=int(tokens.shape[1]),
    )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    result = perplexity(model.eval(), request["eval_ids"])
    answer = {
        "ppl": result.ppl,
        "quantize_s": seconds,
        "quantize_cpu_s": cpu_seconds,
        "eval_s": result.seconds,
        "scored_tokens": result.scored_tokens,
    }
    Path(answer_path).write_text(json.dumps(answer))


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
