"""Smoke requests against a running OpenAI-compatible server, with latency and tokens/s."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from gcupipe.errors import StageError


@dataclass
class CheckResult:
    """One endpoint check as it lands in checks.json."""

    endpoint: str
    ok: bool
    latency_s: float
    completion_tokens: int = 0
    tokens_per_s: float | None = None
    text: str = ""
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _request(url: str, payload: dict[str, Any] | None, timeout_s: float) -> dict[str, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


def _timed(endpoint: str, call: Any) -> CheckResult:
    started = time.perf_counter()
    try:
        body = call()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        detail = (
            exc.read().decode(errors="replace")[:300]
            if isinstance(exc, urllib.error.HTTPError)
            else str(exc)
        )
        return CheckResult(endpoint, False, time.perf_counter() - started, error=detail)
    latency = time.perf_counter() - started
    usage = body.get("usage") or {}
    tokens = int(usage.get("completion_tokens") or 0)
    text = ""
    choices = body.get("choices") or []
    if choices:
        first = choices[0]
        text = first.get("text") or (first.get("message") or {}).get("content") or ""
    elif "data" in body:
        text = ",".join(str(model.get("id")) for model in body["data"])
    return CheckResult(
        endpoint, True, latency, tokens, round(tokens / latency, 3) if tokens else None, text
    )


def run_checks(
    base_url: str, model_name: str, prompt: str, max_tokens: int, chat: bool, timeout_s: float
) -> list[CheckResult]:
    """GET /v1/models, POST /v1/completions and, when the model has a chat template,
    /v1/chat/completions. Greedy, so a check is reproducible."""
    results = [_timed("/v1/models", lambda: _request(base_url + "/v1/models", None, timeout_s))]
    completion = {
        "model": model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    results.append(
        _timed(
            "/v1/completions", lambda: _request(base_url + "/v1/completions", completion, timeout_s)
        )
    )
    if chat:
        message = {
            "model": model_name,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "messages": [{"role": "user", "content": prompt}],
        }
        results.append(
            _timed(
                "/v1/chat/completions",
                lambda: _request(base_url + "/v1/chat/completions", message, timeout_s),
            )
        )
    return results


def raise_on_failed(results: list[CheckResult], log_hint: str) -> None:
    failed = [result for result in results if not result.ok]
    if failed:
        details = "; ".join(f"{result.endpoint}: {result.error}" for result in failed)
        raise StageError(f"server checks failed ({details}); {log_hint}")
