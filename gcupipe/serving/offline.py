"""Offline generation through `vllm.LLM`, run as a child: `python -m gcupipe.serving.offline SPEC`.

A child process keeps vLLM's memory, threads and engine state out of the gcupipe process and
lets one spec carry several models (one Python + vLLM import for all of them, which is most of
the start-up time on CPU). SPEC is JSON:

    {"jobs": [{"llm": {...LLM keywords...}, "prompts": [...], "max_tokens": 16,
               "temperature": 0.0, "logprobs": null, "env": {}, "warmup": false,
               "repeats": 1, "output": "out.jsonl", "loaded_layers": false}],
     "summary": "summary.json"}

Each job writes one JSON line per prompt (prompt, text, token_ids, logprobs when asked) and
the summary gets tokens/s per job. With "loaded_layers": true, the job also writes what vLLM
itself built from the checkpoint into `<output stem>.layers.json` (`loaded_layers`): the
quantization method of every layer and the dtype and shape of each parameter it holds after
loading.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _logprob_rows(output: Any) -> list[dict[str, float]] | None:
    if output.logprobs is None:
        return None
    return [
        {str(token): entry.logprob for token, entry in step.items()} for step in output.logprobs
    ]


def loaded_layers(model: Any) -> dict[str, dict[str, Any]]:
    """Every module of a loaded vLLM model that has a quantization method: the method's class
    and the module's own parameters (dtype, shape) as they are after weight loading."""
    layers = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        layers[name] = {
            "method": type(method).__name__,
            "params": {
                param: [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
                for param, tensor in module.named_parameters(recurse=False)
            },
        }
    return layers


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load one model, generate for every prompt, write the JSONL, return figures."""
    from vllm import LLM, SamplingParams

    os.environ.update(job.get("env", {}))  # per-model switches read at load (e.g. plugin modes)
    started = time.perf_counter()
    llm = LLM(**job["llm"])
    load_s = time.perf_counter() - started
    if job.get("loaded_layers"):
        layers = llm.apply_model(loaded_layers)[0]  # one worker on CPU
        Path(job["output"]).with_suffix(".layers.json").write_text(json.dumps(layers, indent=1))
    params = SamplingParams(
        max_tokens=int(job.get("max_tokens", 16)),
        temperature=float(job.get("temperature", 0.0)),
        logprobs=job.get("logprobs"),
        ignore_eos=bool(job.get("ignore_eos", False)),
    )
    prompts = list(job["prompts"])  # text, or token ids (a list) to bypass the tokenizer
    inputs: Any = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in prompts]
    warmup_s = 0.0
    if job.get("warmup"):  # first batches pay one-time costs; benchmarks time the steady state
        began = time.perf_counter()
        llm.generate(inputs[:1], SamplingParams(max_tokens=4), use_tqdm=False)
        warmup_s = time.perf_counter() - began
    timings = []
    results = None
    for _ in range(max(1, int(job.get("repeats", 1)))):  # every repeat timed: report the spread
        began = time.perf_counter()
        outcome = llm.generate(inputs, params, use_tqdm=False)
        timings.append(time.perf_counter() - began)
        results = results or outcome
    assert results is not None
    generated = 0
    with Path(job["output"]).open("w") as handle:
        for prompt, result in zip(prompts, results, strict=True):
            completion = result.outputs[0]
            generated += len(completion.token_ids)
            row = {
                "prompt": prompt,
                "text": completion.text,
                "token_ids": list(completion.token_ids),
                "finish_reason": completion.finish_reason,
            }
            logprobs = _logprob_rows(completion)
            if logprobs is not None:
                row["logprobs"] = logprobs
            handle.write(json.dumps(row) + "\n")
    del llm
    gc.collect()
    generate_s = min(timings)
    return {
        "output": job["output"],
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3),
        "generate_s": round(generate_s, 3),
        "generate_s_each": [round(t, 3) for t in timings],
        "prompts": len(prompts),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / generate_s, 3) if generate_s > 0 else None,
    }


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    summary = [run_job(job) for job in spec["jobs"]]
    Path(spec["summary"]).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
