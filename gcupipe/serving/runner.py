"""The two serve modes as child processes: offline generation and an online server with checks.

Callers (the serve stage, benchmarks) describe what to run with the plain request types below;
nothing here knows about recipes or stages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gcupipe.serving.args import VllmArgs, render_command, server_command
from gcupipe.serving.checks import raise_on_failed, run_checks
from gcupipe.serving.load import LoadFigures, LoadSpec, run_load, write_load_report
from gcupipe.serving.platform import child_tmp, claim_tmp, release_tmp
from gcupipe.serving.server import (
    ServerProcess,
    ensure_port_free,
    failure,
    free_port,
    stop_with_parent,
)


@dataclass(frozen=True)
class ServeRequest:
    """One model to serve with vLLM: its engine arguments, the prompts to run or check with, and
    where the logs and results go (`out_dir`). The environment is the child's whole env."""

    args: VllmArgs
    prompts: list[str]
    max_tokens: int
    env: dict[str, str]
    out_dir: Path
    timeout_s: float  # offline: the whole run; online: waiting for /health
    request_timeout_s: float = 120.0
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free one
    chat_template: bool = False  # online: check /v1/chat/completions too
    stop_grace_s: float = 10.0
    keep_alive: bool = False  # online: leave the server running after the checks
    keep_alive_dir: Path | None = None  # where the log of a server left running goes
    load: LoadSpec | None = None  # online: a load check after the endpoint checks
    api_key: str | None = None  # online: the server asks clients for it (in env, VLLM_API_KEY)


@dataclass
class ServeResult:
    command: str
    log_file: Path
    tokens_per_s: float | None
    outputs_file: Path | None = None
    checks_file: Path | None = None
    latency_s: float | None = None
    endpoint: str | None = None
    pid: int | None = None
    load: LoadFigures | None = None
    load_file: Path | None = None


def run_child(
    command: list[str], env: dict[str, str], log_path: Path, cwd: Path, timeout_s: float
) -> int | None:
    """Run a child in its own process group; kill the whole group on timeout (returns None)
    or when gcupipe itself is interrupted."""
    env = child_tmp(env)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=stop_with_parent,
        )
        claim_tmp(env, process.pid)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            release_tmp(env)


def offline_spec(jobs: list[dict[str, Any]], summary: Path) -> dict[str, Any]:
    return {"jobs": jobs, "summary": str(summary)}


def run_offline_spec(
    spec: dict[str, Any], work_dir: Path, env: dict[str, str], log_path: Path, timeout_s: float
) -> list[dict[str, Any]]:
    """Run `gcupipe.serving.offline` on a spec; raise a StageError with the log tail on failure."""
    spec_path = work_dir / "offline_spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, "-m", "gcupipe.serving.offline", str(spec_path)]
    code = run_child(command, env, log_path, work_dir, timeout_s)
    if code is None:
        raise failure(f"offline vLLM run did not finish in {timeout_s:g} s", log_path)
    if code != 0:
        raise failure(f"offline vLLM run failed with exit code {code}", log_path)
    summary: list[dict[str, Any]] = json.loads(Path(spec["summary"]).read_text())
    return summary


def run_offline(request: ServeRequest, log: Callable[[str], None]) -> ServeResult:
    """Generate for every prompt through `vllm.LLM` in a child process."""
    out = request.out_dir
    job = {
        "llm": request.args.llm_kwargs(),
        "prompts": request.prompts,
        "max_tokens": request.max_tokens,
        "temperature": 0.0,
        "output": str(out / "outputs.jsonl"),
    }
    log_path = out / "vllm.log"
    spec = offline_spec([job], out / "summary.json")
    summary = run_offline_spec(spec, out, request.env, log_path, request.timeout_s)[0]
    log(
        f"serve offline: {summary['generated_tokens']} tokens at "
        f"{summary['tokens_per_s']} tokens/s -> {job['output']}"
    )
    return ServeResult(
        command=f"vllm.LLM(**{request.args.llm_kwargs()!r})",
        log_file=log_path,
        outputs_file=out / "outputs.jsonl",
        tokens_per_s=summary["tokens_per_s"],
    )


def run_online(request: ServeRequest, log: Callable[[str], None]) -> ServeResult:
    """Start vLLM's OpenAI server, check its endpoints with the first prompt, stop it (unless
    `keep_alive`)."""
    out = request.out_dir
    # keep_alive: the log must outlive the stage's temp output dir
    log_dir = request.keep_alive_dir if request.keep_alive and request.keep_alive_dir else out
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "vllm-server.log"
    server, base_url = start_server(
        request.args, request.env, log_path, request.host, request.port, request.keep_alive
    )
    log(f"serve online: {render_command(server.command)}")
    keep = False
    load, load_file = None, None
    try:
        server.wait_healthy(base_url, request.timeout_s)
        name = request.args.served_model_name or request.args.model
        results = run_checks(
            base_url,
            name,
            request.prompts[0],
            request.max_tokens,
            request.chat_template,
            request.request_timeout_s,
            request.api_key,
        )
        checks_path = out / "checks.json"
        checks_path.write_text(json.dumps([r.as_dict() for r in results], indent=2))
        raise_on_failed(results, f"see {log_path}")
        if request.load is not None:
            load, rows = run_load(base_url, name, request.prompts, request.load, log)
            load_file = write_load_report(load, rows, out)
            log(f"serve online: load check: {load.summary()}")
        keep = request.keep_alive
    finally:
        if keep:
            server.detach()
        else:
            server.stop(request.stop_grace_s)
    completion = next(r for r in results if r.endpoint == "/v1/completions")
    log(
        f"serve online: /v1/completions {completion.latency_s:.3f} s, "
        f"{completion.tokens_per_s} tokens/s: {completion.text!r}"
    )
    if keep:
        log(
            f"serve online: server left running at {base_url} (pid {server.pid}); stop it "
            f"with: kill -TERM -{server.pid}"
        )
    else:
        log_copy = out / "vllm-server.log"
        if log_path != log_copy:
            log_copy.write_bytes(log_path.read_bytes())
            log_path = log_copy
    return ServeResult(
        command=render_command(server.command),
        endpoint=base_url if keep else None,
        pid=server.pid if keep else None,
        log_file=log_path,
        checks_file=checks_path,
        latency_s=round(completion.latency_s, 4),
        tokens_per_s=completion.tokens_per_s,
        load=load,
        load_file=load_file,
    )


def start_server(
    args: VllmArgs,
    env: dict[str, str],
    log_path: Path,
    host: str,
    port: int | None = None,
    outlive: bool = False,
) -> tuple[ServerProcess, str]:
    """Start vLLM's OpenAI server on `port` (None: a free one); returns it and its base URL.
    `outlive`: it may keep running after gcupipe ends (keep_alive)."""
    if port is not None:
        ensure_port_free(host, port)
    port = port or free_port(host)
    command = server_command(args, host, port)
    server = ServerProcess(command, env, log_path, cwd=log_path.parent, outlive=outlive)
    return server, f"http://{host}:{port}"


@contextmanager
def running_server(
    args: VllmArgs,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    host: str = "127.0.0.1",
    stop_grace_s: float = 10.0,
) -> Iterator[str]:
    """vLLM's OpenAI server for the duration of the block, healthy; yields its base URL."""
    server, base_url = start_server(args, env, log_path, host)
    try:
        server.wait_healthy(base_url, timeout_s)
        yield base_url
    finally:
        server.stop(stop_grace_s)
