"""`uses: serve`: serve the built model with real vLLM, offline (vllm.LLM) or online (server)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from gcupipe.errors import GateFailed, StageError
from gcupipe.formats.results import RuleResult
from gcupipe.platform import Platform
from gcupipe.serving.args import (
    Artifact,
    VllmArgs,
    derive_quantization,
    inspect_artifact,
    render_command,
    server_command,
)
from gcupipe.serving.load import LoadFigures, LoadSpec
from gcupipe.serving.platform import detect_platform, platform_env
from gcupipe.serving.server import stop_group
from gcupipe.stages.base import Problem, Stage, StageContext, StageOutputs, TargetedConfig
from gcupipe.stages.resources import Resources
from gcupipe.targets.base import Target
from gcupipe.targets.registry import TARGETS

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape

DEFAULT_PROMPTS = ["The capital of France is", "Quantization makes a language model"]


@dataclasses.dataclass(frozen=True)
class Served:
    """How one model is served here: what it is, the platform, vLLM's arguments, the env."""

    artifact: Artifact
    platform: Platform
    args: VllmArgs
    env: dict[str, str]


class LoadConfig(BaseModel):
    """A bounded concurrent load on the started server (online), with gates."""

    model_config = ConfigDict(extra="forbid")

    requests: int = Field(default=64, gt=0, description="Completions to send in all.")
    concurrency: int = Field(default=8, gt=0, description="Requests in flight at most.")
    max_tokens: int = Field(
        default=64, gt=0, description="Tokens each request generates (EOS ignored)."
    )
    timeout_s: float = Field(default=600, gt=0, description="Per request, seconds.")
    max_error_rate: float | None = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Gate: failed requests / requests <= this (none: report only).",
    )
    min_tokens_per_s: float | None = Field(
        default=None, gt=0, description="Gate: generated tokens per second >= this."
    )

    def failures(self, figures: LoadFigures) -> list[str]:
        """The gates the figures miss, as phrases."""
        failed = []
        if self.max_error_rate is not None and figures.error_rate > self.max_error_rate:
            failed.append(
                f"error rate {figures.error_rate:.2%} > max_error_rate {self.max_error_rate:g}"
                + (f" (first: {figures.first_error})" if figures.first_error else "")
            )
        if self.min_tokens_per_s is not None and figures.tokens_per_s < self.min_tokens_per_s:
            failed.append(
                f"{figures.tokens_per_s:.1f} tokens/s < min_tokens_per_s {self.min_tokens_per_s:g}"
            )
        return failed


class ServeConfig(TargetedConfig):
    engine: Literal["vllm"] = Field(default="vllm", description="Serving engine (vLLM only).")
    mode: Literal["offline", "online"] = Field(
        default="online",
        description="offline: prompts through vllm.LLM to JSONL; online: OpenAI server + checks.",
    )
    model: Path | None = Field(
        default=None,
        description="Model directory; default: the `model_dir` of the upstream stage's outputs.",
    )
    quantization: str | None = Field(
        default=None,
        description="vLLM --quantization; default: derived from the artifact ('none' forces none).",
    )
    served_model_name: str | None = Field(default=None, description="Name clients ask for.")
    max_model_len: int | None = Field(default=None, gt=0, description="Context length, tokens.")
    tensor_parallel_size: int = Field(default=1, ge=1, description="Devices per model.")
    trust_remote_code: bool = Field(
        default=False, description="Let vLLM run the model's own Python code (only if trusted)."
    )
    dtype: str = Field(default="auto", description="vLLM --dtype (auto, float32, bfloat16...).")
    enforce_eager: bool | None = Field(
        default=None, description="vLLM --enforce-eager; default: on for CPU (faster start)."
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More vLLM flags, passed through unchanged."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for vLLM.")
    host: str = Field(
        default="127.0.0.1",
        description="Address the online server binds; anything but loopback needs api_key.",
    )
    api_key: str | None = Field(
        default=None,
        description="Online: the key clients must send (vLLM's --api-key, handed over in "
        "VLLM_API_KEY, never on the command line, redacted from logs); e.g. ${env:SERVE_API_KEY}.",
    )
    port: int | None = Field(default=None, gt=0, lt=65536, description="Port; default: a free one.")
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS), description="Prompts to run or check with."
    )
    prompts_file: Path | None = Field(
        default=None, description="A file with one prompt per line (replaces `prompts`)."
    )
    max_tokens: int = Field(default=16, gt=0, description="Tokens to generate per prompt.")
    start_timeout_s: float = Field(default=600, gt=0, description="Wait this long for /health.")
    request_timeout_s: float = Field(default=120, gt=0, description="Per check request.")
    stop_grace_s: float = Field(
        default=10, gt=0, description="After SIGTERM, wait this long before SIGKILL."
    )
    keep_alive: bool = Field(
        default=False, description="Leave the online server running after the checks."
    )
    kv_cache_space_gib: int = Field(
        default=1, gt=0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE), GiB."
    )
    load: LoadConfig | None = Field(
        default=None,
        description="Online: a load check after the endpoint checks (requests, concurrency, "
        "max_tokens; gates max_error_rate, min_tokens_per_s: a miss is exit code 3).",
    )


class ServeOutputs(StageOutputs):
    mode: str = Field(description="offline or online.")
    platform: str = Field(description="The machine's vLLM platform: gcu, ascend, cuda or cpu.")
    model_dir: Path = Field(description="The model that was served.")
    quantization: str | None = Field(description="The --quantization vLLM got (None: none).")
    command: str = Field(description="The exact vLLM command (online) or LLM call (offline).")
    endpoint: str | None = Field(default=None, description="Base URL, online with keep_alive.")
    pid: int | None = Field(default=None, description="Server process id, online with keep_alive.")
    log_file: Path = Field(description="vLLM's log.")
    outputs_file: Path | None = Field(default=None, description="Offline generations (JSONL).")
    checks_file: Path | None = Field(default=None, description="Online check results (JSON).")
    latency_s: float | None = Field(default=None, description="Completion request latency, s.")
    tokens_per_s: float | None = Field(default=None, description="Generated tokens per second.")
    load: LoadFigures | None = Field(
        default=None, description="The load check's figures (latency p50/p99, TTFT, tokens/s)."
    )
    load_file: Path | None = Field(
        default=None, description="The load check: figures and every request (JSON; plot beside)."
    )


class ServeStage(Stage[ServeConfig, ServeOutputs]):
    """Loads the artifact in real vLLM so "it quantized" becomes "it serves"."""

    Config = ServeConfig
    Outputs = ServeOutputs
    version = "1"

    def resources(self, config: ServeConfig) -> Resources:
        """The accelerators vLLM will use: tensor_parallel_size of the target's devices."""
        if config.target is None:  # the machine it lands on decides
            return Resources()
        device = TARGETS.get(config.target).device_resource
        return Resources.devices(device, config.tensor_parallel_size)

    def check(self, config: ServeConfig) -> list[Problem]:
        problems = []
        if config.keep_alive and config.mode == "offline":
            problems.append(Problem("keep_alive only applies to mode: online", "keep_alive"))
        if config.load is not None and config.mode == "offline":
            problems.append(Problem("load only applies to mode: online", "load"))
        if config.mode == "online" and config.api_key is None and not _loopback(config.host):
            problems.append(
                Problem(
                    f"host {config.host} exposes the server beyond this machine: set api_key "
                    "(e.g. ${env:SERVE_API_KEY}) so that it refuses clients without it",
                    "host",
                )
            )
        if config.prompts_file is not None and not config.prompts_file.is_file():
            problems.append(Problem(f"{config.prompts_file} does not exist", "prompts_file"))
        if config.model is not None and (config.model / "config.json").is_file():
            target = _target(config)
            try:
                quantization = self._quantization(config, inspect_artifact(config.model), target)
            except StageError as exc:
                problems.append(Problem(str(exc), "model"))
            else:
                result = _flag_result(config.model, quantization, target)
                if result.failed:
                    problems.append(Problem(result.message, "quantization"))
        return problems

    def describe(self, config: ServeConfig, cache_dir: Path) -> str | None:
        """The exact command (or LLM call); what only the run can know is named in <...>."""
        known = config.model is not None and config.model.is_dir()
        model = str(config.model) if config.model else "<upstream model_dir>"
        platform = detect_platform()
        target = _target(config, platform)
        notes = []
        artifact = None
        where = f"{platform.value}" + (
            f" for target {target.name}" if target.name != platform else ""
        )
        try:
            if known:
                artifact = inspect_artifact(config.model)  # type: ignore[arg-type]
            elif config.quantization is None:
                notes.append("--quantization follows the model's files at run time")
            quantization = self._quantization(config, artifact, target)
        except StageError as exc:
            return f"vllm {config.mode} on {where}: {exc}"
        args = self._vllm_args(config, model, quantization, platform, target, artifact)
        if config.mode == "online":
            command = server_command(args, config.host, config.port or 0)
            if not config.port:
                command[-1] = "<free port>"
            line = f"vllm online on {where}: {render_command(command)}"
        else:
            line = f"vllm offline on {where}: vllm.LLM(**{args.llm_kwargs()!r})"
        return line + (f"  ({'; '.join(notes)})" if notes else "")

    # -- run ---------------------------------------------------------------------------------

    def run(self, config: ServeConfig, ctx: StageContext) -> ServeOutputs:
        if config.api_key:
            ctx.secrets(config.api_key)
        served = self.prepare(config, ctx)
        from gcupipe.serving.runner import ServeRequest, run_offline, run_online

        offline = config.mode == "offline"
        request = ServeRequest(
            args=served.args,
            prompts=_prompts(config),
            max_tokens=config.max_tokens,
            env=served.env | ({"VLLM_API_KEY": config.api_key} if config.api_key else {}),
            out_dir=ctx.output_dir,
            timeout_s=config.start_timeout_s + (config.request_timeout_s if offline else 0),
            request_timeout_s=config.request_timeout_s,
            host=config.host,
            port=config.port,
            chat_template=served.artifact.chat_template,
            stop_grace_s=config.stop_grace_s,
            keep_alive=config.keep_alive,
            keep_alive_dir=ctx.run_dir / "servers" / ctx.stage_id,
            load=_load_spec(config.load, config.api_key),
            api_key=config.api_key,
        )
        result = run_offline(request, ctx.log) if offline else run_online(request, ctx.log)
        outputs = ServeOutputs(
            mode=config.mode,
            platform=served.platform.value,
            model_dir=served.artifact.model_dir,
            quantization=served.args.quantization,
            **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
        )
        failed = config.load.failures(result.load) if config.load and result.load else []
        if failed:
            if result.pid is not None:  # keep_alive: a server that failed its gate is no result
                stop_group(result.pid)
            raise GateFailed(f"serve: load check: {'; '.join(failed)}; report: {result.load_file}")
        return outputs

    def estimate(
        self, config: ServeConfig, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        from gcupipe.estimate import VLLM_PROCESS_BYTES, VLLM_START_S, Estimate, model_shape

        model = model_shape(config.model, upstream)
        if model is None:
            return None
        # vLLM holds the weights as the files store them (int8 stays int8), the KV cache it
        # is given, and its own processes
        kv = config.kv_cache_space_gib << 30
        rss = VLLM_PROCESS_BYTES + model.tensor_bytes + kv
        tokens = len(_prompts(config)) * config.max_tokens
        if config.load is not None:
            tokens += config.load.requests * config.load.max_tokens
        seconds = VLLM_START_S + machine.io_seconds(model.tensor_bytes)
        seconds += machine.compute_seconds(2 * tokens * model.params)
        basis = f"weights as stored, {config.kv_cache_space_gib} GiB KV cache"
        return Estimate(1 << 20, rss, seconds, model, basis)

    def prepare(self, config: ServeConfig, ctx: StageContext) -> Served:
        """The vLLM arguments and environment that serve the stage's model on this machine
        (also what evaluate starts its servers with); StageError when it cannot load here."""
        model_dir = self._model_dir(config, ctx)
        artifact = inspect_artifact(model_dir)
        platform = detect_platform()
        target = _target(config, platform)
        if target.name != platform.value:
            raise StageError(
                f"serve: this machine runs vLLM on {platform.value}, but the stage's target is "
                f"{target.name} ({target.summary}): serve on a {target.name} machine, or set "
                f"`target: {platform.value}` on the serve stage (validate checks the files "
                "load there)"
            )
        quantization = self._quantization(config, artifact, target)
        result = _flag_result(model_dir, quantization, target)
        if result.failed:
            raise StageError(f"serve: {result.message}")
        args = self._vllm_args(config, str(model_dir), quantization, platform, target, artifact)
        if artifact.int8_kv_cache and args.kv_cache_dtype is None:
            ctx.log(
                f"the int8 KV cache scales are not read on {target.name}; it serves with "
                "its default KV cache"
            )
        env = {
            **os.environ,
            **platform_env(platform, ctx.run_dir, config.kv_cache_space_gib),
            **config.env,
        }
        ctx.log(
            f"serve: {artifact.format} model {model_dir} on {platform.value}, "
            f"quantization={quantization}"
        )
        return Served(artifact, platform, args, env)

    def _model_dir(self, config: ServeConfig, ctx: StageContext) -> Path:
        return config.model if config.model is not None else ctx.upstream_model_dir("serve")

    def _quantization_flag(self, config: ServeConfig) -> str | None:
        """The recipe's `quantization` as vLLM gets it (None: derive from the files)."""
        if config.quantization is None or config.quantization.lower() == "none":
            return None
        return config.quantization

    def _quantization(
        self, config: ServeConfig, artifact: Artifact | None, target: Target
    ) -> str | None:
        if config.quantization is not None:
            return self._quantization_flag(config)
        return derive_quantization(artifact, target) if artifact is not None else None

    def _vllm_args(
        self,
        config: ServeConfig,
        model: str,
        quantization: str | None,
        platform: Platform,
        target: Target,
        artifact: Artifact | None = None,
    ) -> VllmArgs:
        eager = config.enforce_eager
        kv = artifact is not None and artifact.int8_kv_cache
        return VllmArgs(
            model=model,
            quantization=quantization,
            served_model_name=config.served_model_name,
            max_model_len=config.max_model_len,
            tensor_parallel_size=config.tensor_parallel_size,
            trust_remote_code=config.trust_remote_code,
            dtype=config.dtype,
            enforce_eager=(platform is Platform.CPU) if eager is None else eager,
            kv_cache_dtype=target.kv_cache_dtype() if kv else None,
            extra_args=list(config.extra_args),
        )


def _load_spec(load: LoadConfig | None, api_key: str | None) -> LoadSpec | None:
    if load is None:
        return None
    return LoadSpec(load.requests, load.concurrency, load.max_tokens, load.timeout_s, api_key)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _prompts(config: ServeConfig) -> list[str]:
    """The recipe's prompts, or one per non-empty line of `prompts_file`."""
    if config.prompts_file is not None:
        lines = [line.strip() for line in config.prompts_file.read_text().splitlines()]
        return [line for line in lines if line]
    return list(config.prompts)


def _target(config: ServeConfig, platform: Platform | None = None) -> Target:
    """The stage's target, else the machine's: serve loads the files where it runs."""
    return TARGETS.get(config.target or (platform or detect_platform()).value)


def _flag_result(model_dir: Path, quantization: str | None, target: Target) -> RuleResult:
    """Whether the flag fits the files on the target (the seed guide's W8A8 model served with
    quantization="w4a16"; a MoE AWQ model on GCU without moe_wna16_gcu), naming the right one."""
    from gcupipe.validation.rules import check_quantization_flag

    return check_quantization_flag(model_dir, quantization, target.name)
