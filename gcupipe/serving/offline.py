"""Offline generation through `vllm.LLM`, run as a child: `python -m gcupipe.serving.offline SPEC`.

A child process keeps vLLM's memory, threads and engine state out of the gcupipe process and
lets one spec carry several models (one Python + vLLM import for all of them, which is most of
the start-up time on CPU). SPEC is JSON:

    {"jobs": [{"llm": {...LLM keywords...}, "prompts": [...], "max_tokens": 16,
               "temperature": 0.0, "logprobs": null, "env": {}, "warmup": false,
               "repeats": 1, "output": "out.jsonl", "loaded_layers": false}],
     "summary": "summary.json", "interleave": false}

With "interleave": true every engine is loaded first and the jobs' repeats run in turn (for
benchmarks). Each job writes one JSON line per prompt (prompt, text, token_ids, logprobs when
asked) and the summary gets tokens/s per job (each repeat's too), the process tree's RSS once it
is loaded and warm (with one job: runtime, weights, KV cache) and the kernels its layers run.
With
"loaded_layers": true, the job also writes what vLLM itself built from the checkpoint into
`<output stem>.layers.json` (`loaded_layers`): the quantization method of every layer and the
dtype and shape of each parameter it holds after loading.
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
    """Every module of a loaded vLLM model that has a quantization method: the method's class,
    the vLLM kernel it runs (None: none) and the module's own parameters (dtype, shape) as
    they are after weight loading."""
    layers = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        kernel = _kernel_of(module, method)
        layers[name] = {
            "method": type(method).__name__,
            "kernel": None if kernel is None else type(kernel).__name__,
            "params": {
                param: [str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]
                for param, tensor in module.named_parameters(recurse=False)
            },
        }
    return layers


def _kernel_of(module: Any, method: Any) -> Any:
    """The vLLM kernel object a layer's quantization method runs (ours and compressed-tensors'
    schemes keep it as `.kernel`), or None."""
    kernel = getattr(method, "kernel", None)
    if kernel is None:
        kernel = getattr(getattr(module, "scheme", None), "kernel", None)
    return kernel


def _tree_rss() -> int:
    """RSS of this process and its children (vLLM on CPU runs its engine in this process)."""
    import psutil  # type: ignore[import-untyped]

    total = 0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            total += int(process.memory_info().rss)
        except psutil.Error:
            pass
    return total


class _Engine:
    """One job's loaded `vllm.LLM`, warmed up when the job asks, with its load figures."""

    def __init__(self, job: dict[str, Any]):
        from vllm import LLM, SamplingParams

        self.job = job
        os.environ.update(job.get("env", {}))  # per-model switches read at load (plugin modes)
        started = time.perf_counter()
        self.llm = LLM(**job["llm"])
        self.load_s = time.perf_counter() - started
        layers = self.llm.apply_model(loaded_layers)[0]  # one worker on CPU
        if job.get("loaded_layers"):
            Path(job["output"]).with_suffix(".layers.json").write_text(json.dumps(layers, indent=1))
        # the kernel (or, where it runs none, the method) of every quantized layer
        self.kernels = sorted(
            {
                layer["kernel"] or layer["method"]
                for layer in layers.values()
                if not layer["method"].startswith("Unquantized")
            }
        )
        self.params = SamplingParams(
            max_tokens=int(job.get("max_tokens", 16)),
            temperature=float(job.get("temperature", 0.0)),
            logprobs=job.get("logprobs"),
            ignore_eos=bool(job.get("ignore_eos", False)),
        )
        self.prompts = list(job["prompts"])  # text, or token ids (a list): no tokenizer
        self.inputs: Any = [
            {"prompt_token_ids": p} if isinstance(p, list) else p for p in self.prompts
        ]
        self.warmup_s = 0.0
        if job.get("warmup"):  # first batches pay one-time costs: benchmarks time what follows
            began = time.perf_counter()
            self.llm.generate(self.inputs[:1], SamplingParams(max_tokens=4), use_tqdm=False)
            self.warmup_s = time.perf_counter() - began
        self.rss = _tree_rss()  # with one job per process: runtime, weights and KV cache
        self.timings: list[float] = []
        self.results: Any = None

    def generate(self) -> None:
        began = time.perf_counter()
        outcome = self.llm.generate(self.inputs, self.params, use_tqdm=False)
        self.timings.append(time.perf_counter() - began)
        self.results = self.results or outcome

    def finish(self) -> dict[str, Any]:
        """Write the first run's outputs (JSONL), free the engine, return the figures."""
        generated = 0
        with Path(self.job["output"]).open("w") as handle:
            for prompt, result in zip(self.prompts, self.results, strict=True):
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
        del self.llm
        gc.collect()
        generate_s = min(self.timings)
        return {
            "output": self.job["output"],
            "load_s": round(self.load_s, 3),
            "warmup_s": round(self.warmup_s, 3),
            "generate_s": round(generate_s, 3),
            "generate_s_each": [round(t, 3) for t in self.timings],
            "prompts": len(self.prompts),
            "generated_tokens": generated,
            "tokens_per_s": round(generated / generate_s, 3) if generate_s > 0 else None,
            "tokens_per_s_each": [round(generated / t, 3) for t in self.timings],
            "rss_gb": round(self.rss / 1e9, 3),
            "kernels": self.kernels,
        }


def _repeats(job: dict[str, Any]) -> int:
    return max(1, int(job.get("repeats", 1)))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load one model, generate for every prompt (every repeat timed), write the JSONL."""
    engine = _Engine(job)
    for _ in range(_repeats(job)):
        engine.generate()
    return engine.finish()


def run_interleaved(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every job's engine loaded at once, then repeat r of every engine before any repeat r+1:
    a drift of the machine's pace touches every engine alike (benchmarks)."""
    engines = [_Engine(job) for job in jobs]
    for repeat in range(max(_repeats(job) for job in jobs)):
        for engine in engines:
            if repeat < _repeats(engine.job):
                engine.generate()
    return [engine.finish() for engine in engines]


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    jobs = spec["jobs"]
    summary = run_interleaved(jobs) if spec.get("interleave") else [run_job(j) for j in jobs]
    Path(spec["summary"]).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
