"""A bounded concurrent load on a running OpenAI-compatible server, with vLLM's own
serving-benchmark request function (`vllm.benchmarks.lib.endpoint_request_func`: streamed
/v1/completions, time to first token, inter-token latencies) driven by an asyncio semaphore.

Every request asks for exactly `max_tokens` (ignore_eos), so tokens/s compares across models."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from gcupipe.errors import require
from gcupipe.serving.checks import auth_headers


@dataclass(frozen=True)
class LoadSpec:
    requests: int
    concurrency: int
    max_tokens: int
    timeout_s: float
    api_key: str | None = None  # the server's, sent with every request


class LoadFigures(BaseModel):
    """What the load measured; latencies in seconds, over the successful requests."""

    model_config = ConfigDict(frozen=True)

    requests: int
    concurrency: int
    errors: int
    error_rate: float
    duration_s: float
    output_tokens: int
    tokens_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    first_error: str | None

    def summary(self) -> str:
        def s(value: float | None) -> str:
            return f"{value:.3f} s" if value is not None else "n/a"

        return (
            f"{self.requests} requests at concurrency {self.concurrency}: {self.errors} errors, "
            f"{self.tokens_per_s:.1f} tokens/s, latency p50 {s(self.latency_p50_s)} p99 "
            f"{s(self.latency_p99_s)}, TTFT p50 {s(self.ttft_p50_s)} p99 {s(self.ttft_p99_s)}"
        )


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def run_load(
    base_url: str, model: str, prompts: list[str], spec: LoadSpec, log: Callable[[str], None]
) -> tuple[LoadFigures, list[dict[str, Any]]]:
    """Send `spec.requests` completions (prompts in turn), at most `spec.concurrency` at once;
    `log` hears of every tenth of them done."""
    return asyncio.run(_load(base_url, model, prompts, spec, log))


async def _load(
    base_url: str, model: str, prompts: list[str], spec: LoadSpec, log: Callable[[str], None]
) -> tuple[LoadFigures, list[dict[str, Any]]]:
    aiohttp = require("aiohttp", "serve")
    bench = require("vllm.benchmarks.lib.endpoint_request_func", "serve")
    gate = asyncio.Semaphore(spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    done = 0
    step = max(1, spec.requests // 10)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(index: int) -> Any:
            request = bench.RequestFuncInput(
                prompt=prompts[index % len(prompts)],
                api_url=base_url.rstrip("/") + "/v1/completions",
                prompt_len=0,
                output_len=spec.max_tokens,
                model=model,
                ignore_eos=True,
                request_id=f"gcupipe-load-{index}",
                extra_headers=auth_headers(spec.api_key) or None,
            )
            nonlocal done
            async with gate:
                try:
                    output = await bench.async_request_openai_completions(request, session)
                except (TimeoutError, aiohttp.ClientError) as exc:  # a dead or hung server
                    output = bench.RequestFuncOutput(error=f"{type(exc).__name__}: {exc}")
            done += 1
            if done % step == 0 or done == spec.requests:
                log(f"load check: {done}/{spec.requests} requests done")
            return output

        started = time.perf_counter()
        outputs = await asyncio.gather(*(one(i) for i in range(spec.requests)))
        duration = time.perf_counter() - started
    ok = [o for o in outputs if o.success]
    errors = [o for o in outputs if not o.success]
    tokens = sum(o.output_tokens or 0 for o in ok)
    figures = LoadFigures(
        requests=spec.requests,
        concurrency=spec.concurrency,
        errors=len(errors),
        error_rate=len(errors) / spec.requests,
        duration_s=round(duration, 3),
        output_tokens=tokens,
        tokens_per_s=round(tokens / duration, 2) if duration > 0 else 0.0,
        latency_p50_s=percentile([o.latency for o in ok], 50),
        latency_p99_s=percentile([o.latency for o in ok], 99),
        ttft_p50_s=percentile([o.ttft for o in ok], 50),
        ttft_p99_s=percentile([o.ttft for o in ok], 99),
        first_error=(errors[0].error or "failed")[:300] if errors else None,
    )
    rows = [
        {
            "index": i,
            "success": o.success,
            "start_s": round(o.start_time - started, 4) if o.start_time else None,
            "latency_s": o.latency,
            "ttft_s": o.ttft,
            "output_tokens": o.output_tokens,
            "error": o.error or None,
        }
        for i, o in enumerate(outputs)
    ]
    return figures, rows


def write_load_report(figures: LoadFigures, rows: list[dict[str, Any]], out: Path) -> Path:
    """load.json (figures + every request) and load.png (latency and TTFT per request over the
    run, errors marked); returns the JSON's path."""
    report = out / "load.json"
    document = {"figures": figures.model_dump(), "requests": rows}
    report.write_text(json.dumps(document, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 3.4))
    ok = [r for r in rows if r["success"]]
    axes.scatter([r["start_s"] for r in ok], [r["latency_s"] for r in ok], s=8, label="latency")
    axes.scatter([r["start_s"] for r in ok], [r["ttft_s"] for r in ok], s=8, label="TTFT")
    failed = [r for r in rows if not r["success"] and r["start_s"] is not None]
    if failed:
        axes.scatter([r["start_s"] for r in failed], [0] * len(failed), marker="x", label="error")
    axes.set_xlabel("request start, s")
    axes.set_ylabel("seconds")
    axes.set_title(
        f"{figures.requests} requests, concurrency {figures.concurrency}: "
        f"{figures.tokens_per_s:.0f} tokens/s"
    )
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "load.png", dpi=100)
    pyplot.close(figure)
    return report
