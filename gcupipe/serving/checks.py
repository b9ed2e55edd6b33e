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


def auth_headers(api_key: str | None) -> dict[str, str]:
    """What a client of a server started with an API key sends (OpenAI's bearer token)."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _request(
    url: str, payload: dict[str, Any] | None, timeout_s: float, api_key: str | None = None
) -> dict[str, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json"} if data else {}
    request = urllib.request.Request(url, data=data, headers=headers | auth_headers(api_key))
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


def _refused_without_key(base_url: str, timeout_s: float) -> CheckResult:
    """A request without the key must be refused with 401."""
    started = time.perf_counter()
    try:
        _request(base_url + "/v1/models", None, timeout_s)
    except urllib.error.HTTPError as exc:
        latency = time.perf_counter() - started
        if exc.code == 401:
            return CheckResult("/v1/models without the key", True, latency, text="401")
        return CheckResult("/v1/models without the key", False, latency, error=f"{exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return CheckResult("/v1/models without the key", False, 0.0, error=str(exc))
    latency = time.perf_counter() - started
    return CheckResult(
        "/v1/models without the key", False, latency, error="answered 200: the key is not asked"
    )


def run_checks(
    base_url: str,
    model_name: str,
    prompt: str,
    max_tokens: int,
    chat: bool,
    timeout_s: float,
    api_key: str | None = None,
) -> list[CheckResult]:
    """GET /v1/models, POST /v1/completions and, when the model has a chat template,
    /v1/chat/completions. Greedy, so a check is reproducible. With `api_key` every request
    carries it, and one more without it must be refused (401)."""

    def call(path: str, payload: dict[str, Any] | None) -> Any:
        return lambda: _request(base_url + path, payload, timeout_s, api_key)

    results = [_timed("/v1/models", call("/v1/models", None))]
    if api_key:
        results.append(_refused_without_key(base_url, timeout_s))
    completion = {
        "model": model_name,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    results.append(_timed("/v1/completions", call("/v1/completions", completion)))
    if chat:
        message = {
            "model": model_name,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "messages": [{"role": "user", "content": prompt}],
        }
        results.append(_timed("/v1/chat/completions", call("/v1/chat/completions", message)))
    return results


def raise_on_failed(results: list[CheckResult], log_hint: str) -> None:
    failed = [result for result in results if not result.ok]
    if failed:
        details = "; ".join(f"{result.endpoint}: {result.error}" for result in failed)
        raise StageError(f"server checks failed ({details}); {log_hint}")
