"""The peers the accuracy benchmarks compare with, run on gcupipe's own tokens.

llmcompressor and auto-round each pin a transformers other than the project's, so each lives in
a benchmark-only venv under .cache/ (created on first use). `run_peer` hands the peer the
calibration and eval token ids through a file; this module, run by that venv's python,
quantizes with the named preset and answers in JSON:

- llmcompressor presets are scored inside its venv with gcupipe's perplexity (same windows) on
  the model oneshot leaves fake-quantized in memory;
- auto-round exports the GPTQ layout (`auto_gptq`), and `run_peer` scores that directory in the
  project's venv through gcupipe's reader of the layout and its reference runtime, so the number
  is what a GPTQ loader gets from the published files.

    python benchmarks/_peers.py REQUEST.pt ANSWER.json     # inside a peer venv
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PeerVenv:
    directory: Path
    # torch first, from the CPU wheel this machine's pip constraints allow, so that nothing pulls
    # a CUDA torch; the peer then resolves its own transformers inside the venv only.
    requirements: tuple[tuple[str, ...], ...]
    module: str


LLMCOMPRESSOR = PeerVenv(  # 0.14.0.1 pins transformers <= 5.17 (5.17.0 resolves)
    REPO / ".cache" / "bench-venv",
    (("torch==2.13.0",), ("llmcompressor==0.14.0.1",)),
    "llmcompressor",
)
AUTO_ROUND = PeerVenv(
    REPO / ".cache" / "autoround-venv", (("torch==2.13.0",), ("auto-round==0.16.1",)), "auto_round"
)
PRESETS = {
    "gptq-w4-g64-sym": LLMCOMPRESSOR,
    "w8a8": LLMCOMPRESSOR,
    "autoround-w4-g64-sym": AUTO_ROUND,
}


def ensure_venv(venv: PeerVenv) -> Path:
    """The python of a peer's venv, created (python3 -m venv + pip) when missing."""
    python = venv.directory / "bin" / "python"
    stamp = venv.directory / ".gcupipe-ready"
    if stamp.is_file():
        return python
    print(f"creating the {venv.module} benchmark venv at {venv.directory} (a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv.directory)], check=True)
    for requirement in venv.requirements:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *requirement], check=True)
    check = f"import torch, {venv.module}; assert '+cu' not in torch.__version__, torch.__version__"
    subprocess.run([str(python), "-c", check], check=True)
    stamp.write_text(" ".join(r for group in venv.requirements for r in group) + "\n")
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
    """{ppl, quantize_s, quantize_cpu_s, eval_s, scored_tokens} of a peer's `preset`."""
    import torch

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    python = ensure_venv(PRESETS[preset])
    request, answer = work / f"peer-{preset}.pt", work / f"peer-{preset}.json"
    job = {"preset": preset, "calibration": tokens, "eval_ids": eval_ids}
    export = work / f"peer-{preset}"
    torch.save({**job, "model_dir": str(model_dir), "export_dir": str(export)}, request)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        [str(python), str(Path(__file__).resolve()), str(request), str(answer)], check=True, env=env
    )
    result: dict[str, Any] = json.loads(answer.read_text())
    if "export" in result:  # the peer wrote files: score them as a loader reads them
        result.update(score_export(Path(result["export"]), eval_ids))
    return result


def score_export(export: Path, eval_ids: list[int]) -> dict[str, Any]:
    from gcupipe.formats.registry import read_quantized
    from gcupipe.runtime.model import build_model, load_config
    from gcupipe.runtime.perplexity import perplexity

    checkpoint = read_quantized(export)
    model = build_model(load_config(export), checkpoint.float_tensors, checkpoint.linears)
    scored = perplexity(model, eval_ids)
    return {"ppl": scored.ppl, "eval_s": scored.seconds, "scored_tokens": scored.scored_tokens}


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
    """Inside a peer venv: quantize with the preset, answer with what was measured."""
    import torch

    request = torch.load(request_path)
    worker = _auto_round if PRESETS[request["preset"]] is AUTO_ROUND else _llmcompressor
    Path(answer_path).write_text(json.dumps(worker(request)))


def _llmcompressor(request: dict[str, Any]) -> dict[str, Any]:
    """oneshot with the preset, then gcupipe's perplexity of the fake-quantized model."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from gcupipe.runtime.perplexity import perplexity

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
    return {
        "ppl": result.ppl,
        "quantize_s": seconds,
        "quantize_cpu_s": cpu_seconds,
        "eval_s": result.seconds,
        "scored_tokens": result.scored_tokens,
    }


def _auto_round(request: dict[str, Any]) -> dict[str, Any]:
    """SignRound (auto-round's default algorithm, 200 iterations) w4 g64 sym on the same
    calibration samples, exported in the GPTQ layout; the caller scores the files."""
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = request["calibration"]
    model = AutoModelForCausalLM.from_pretrained(request["model_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(request["model_dir"])
    started, cpu_started = time.perf_counter(), time.process_time()
    rounder = AutoRound(
        model,
        tokenizer=tokenizer,
        scheme="W4A16",
        bits=4,
        group_size=64,
        sym=True,
        dataset=[row.unsqueeze(0) for row in tokens],
        iters=200,
        nsamples=int(tokens.shape[0]),
        seqlen=int(tokens.shape[1]),
        device_map="cpu",
    )
    rounder.quantize_and_save(request["export_dir"], format="auto_gptq")
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    # (it writes into a sub-directory named after the model and the scheme)
    export = next(Path(request["export_dir"]).rglob("config.json")).parent
    return {"quantize_s": seconds, "quantize_cpu_s": cpu_seconds, "export": str(export)}


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
