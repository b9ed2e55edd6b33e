"""The two serve modes as child processes: offline generation and an online server with checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gcupipe.serving.args import Artifact, VllmArgs, render_command, server_command
from gcupipe.serving.checks import raise_on_failed, run_checks
from gcupipe.serving.server import ServerProcess, ensure_port_free, failure, free_port

if TYPE_CHECKING:
    from gcupipe.stages.base import StageContext
    from gcupipe.stages.serve import ServeConfig


def prompts_of(config: ServeConfig) -> list[str]:
    """The recipe's prompts, or one per non-empty line of `prompts_file`."""
    if config.prompts_file is not None:
        lines = [line.strip() for line in config.prompts_file.read_text().splitlines()]
        return [line for line in lines if line]
    return list(config.prompts)


def run_child(command: list[str], env: dict[str, str], log_path: Path, cwd: Path,
              timeout_s: float) -> int | None:
    """Run a child in its own process group; kill the whole group on timeout (returns None)
    or when gcupipe itself is interrupted."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
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


def offline_spec(jobs: list[dict[str, Any]], summary: Path) -> dict[str, Any]:
    return {"jobs": jobs, "summary": str(summary)}


def run_offline_spec(spec: dict[str, Any], work_dir: Path, env: dict[str, str], log_path: Path,
                     timeout_s: float) -> list[dict[str, Any]]:
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


def run_offline(config: ServeConfig, ctx: StageContext, args: VllmArgs,
                env: dict[str, str]) -> dict[str, Any]:
    out = ctx.output_dir
    job = {
        "llm": args.llm_kwargs(),
        "prompts": prompts_of(config),
        "max_tokens": config.max_tokens,
        "temperature": 0.0,
        "output": str(out / "outputs.jsonl"),
    }
    log_path = out / "vllm.log"
    summary = run_offline_spec(offline_spec([job], out / "summary.json"), out, env, log_path,
                               config.start_timeout_s + config.request_timeout_s)[0]
    ctx.log(f"serve offline: {summary['generated_tokens']} tokens at "
            f"{summary['tokens_per_s']} tokens/s -> {job['output']}")
    return {
        "command": f"vllm.LLM(**{args.llm_kwargs()!r})",
        "log_file": log_path,
        "outputs_file": Path(job["output"]),
        "tokens_per_s": summary["tokens_per_s"],
    }


def run_online(config: ServeConfig, ctx: StageContext, args: VllmArgs, env: dict[str, str],
               artifact: Artifact) -> dict[str, Any]:
    out = ctx.output_dir
    if config.port is not None:
        ensure_port_free(config.host, config.port)
    port = config.port or free_port(config.host)
    command = server_command(args, config.host, port)
    base_url = f"http://{config.host}:{port}"
    # keep_alive: the log must outlive the stage's temp output dir, so it goes to the run dir
    log_dir = ctx.run_dir / "servers" / ctx.stage_id if config.keep_alive else out
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "vllm-server.log"
    ctx.log(f"serve online: {render_command(command)}")
    server = ServerProcess(command, env, log_path, cwd=log_dir)
    keep = False
    try:
        server.wait_healthy(base_url, config.start_timeout_s)
        name = args.served_model_name or args.model
        results = run_checks(base_url, name, prompts_of(config)[0], config.max_tokens,
                             artifact.chat_template, config.request_timeout_s)
        checks_path = out / "checks.json"
        checks_path.write_text(json.dumps([r.as_dict() for r in results], indent=2))
        raise_on_failed(results, f"see {log_path}")
        keep = config.keep_alive
    finally:
        if keep:
            server.detach()
        else:
            server.stop(config.stop_grace_s)
    completion = next(r for r in results if r.endpoint == "/v1/completions")
    ctx.log(f"serve online: /v1/completions {completion.latency_s:.3f} s, "
            f"{completion.tokens_per_s} tokens/s: {completion.text!r}")
    if keep:
        ctx.log(f"serve online: server left running at {base_url} (pid {server.pid}); stop it "
                f"with: kill -TERM -{server.pid}")
    else:
        log_copy = out / "vllm-server.log"
        if log_path != log_copy:
            log_copy.write_bytes(log_path.read_bytes())
            log_path = log_copy
    return {
        "command": render_command(command),
        "endpoint": base_url if keep else None,
        "pid": server.pid if keep else None,
        "log_file": log_path,
        "checks_file": checks_path,
        "latency_s": round(completion.latency_s, 4),
        "tokens_per_s": completion.tokens_per_s,
    }

