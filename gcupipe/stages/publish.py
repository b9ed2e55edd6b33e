"""`uses: publish`: the release step. The model directory an upstream stage made, with a model
card written from the run's lineage, goes to a ModelScope or Hugging Face repository through
the hubs' own clients; an incomplete bundle is refused before anything is uploaded, and a
repository that already holds the same files gets no new commit."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from gcupipe.errors import StageError
from gcupipe.formats.bundle import missing_files
from gcupipe.formats.modeldir import ModelDir
from gcupipe.hub.common import HubPublish, Published
from gcupipe.hub.errors import hub_stage_error
from gcupipe.hub.manifest import model_files
from gcupipe.hub.retry import retry_call
from gcupipe.hub.sources import hub_module
from gcupipe.stages.base import Problem, Stage, StageConfig, StageContext, StageOutputs
from gcupipe.stages.card import CARD_NAME, CardFacts, gather, render

if TYPE_CHECKING:
    from gcupipe.estimate import Estimate, Machine, ModelShape

BUNDLE_DIR = "bundle"


class PublishConfig(StageConfig):
    hub: Literal["modelscope", "huggingface"] = Field(description="Where to publish.")
    repo_id: str = Field(description="The repository, org/name (created when missing).")
    revision: str | None = Field(
        default=None,
        description="Branch to commit to (created from the default branch when missing). "
        "Default: master on ModelScope, main on Hugging Face.",
    )
    private: bool = Field(
        default=True, description="Create the repository private (an existing one is kept)."
    )
    commit_message: str | None = Field(
        default=None, description="Default: what was made from what, by gcupipe."
    )
    model: Path | None = Field(
        default=None,
        description="Model directory; default: the `model_dir` of the upstream stage (validate).",
    )
    card: bool = Field(default=True, description="Write README.md, the model card, into it.")
    dry_run: bool = Field(
        default=False,
        description="Assemble and check the bundle, say what would be uploaded "
        "where, upload nothing.",
    )
    endpoint: str | None = Field(
        default=None,
        description="Hub URL. Default: $MODELSCOPE_ENDPOINT or $HF_ENDPOINT, else the public hub.",
    )
    token_env: str | None = Field(
        default=None,
        description="Environment variable holding a token that can write the repository. "
        "Default: MODELSCOPE_API_TOKEN or HF_TOKEN. The value is redacted everywhere.",
    )
    retries: int = Field(
        default=3, ge=0, description="Times to retry the upload after a transient failure."
    )
    retry_backoff_s: float = Field(default=2.0, ge=0, description="First wait between tries.")


class PublishOutputs(StageOutputs):
    url: str = Field(description="The repository at the published revision.")
    revision: str = Field(description="The branch committed to.")
    commit: str | None = Field(description="The commit holding the files (none: dry run).")
    committed: bool = Field(description="A new commit was made (false: same content already).")
    files: list[str] = Field(description="The files of the bundle, as in the repository.")
    bundle_dir: Path = Field(description="The bundle as uploaded (links to the model files).")
    card: Path | None = Field(description="The model card written into the bundle.")


class PublishStage(Stage[PublishConfig, PublishOutputs]):
    """Uploads the model with its card to ModelScope or Hugging Face, idempotently."""

    Config = PublishConfig
    Outputs = PublishOutputs
    version = "1"

    def check(self, config: PublishConfig) -> list[Problem]:
        if config.repo_id.count("/") != 1 or config.repo_id.strip("/") != config.repo_id:
            return [Problem("repo_id must look like 'org/name'", "repo_id")]
        return []

    def describe(self, config: PublishConfig, cache_dir: Path) -> str | None:
        hub = hub_module(config.hub)
        revision = config.revision or hub.DEFAULT_REVISION
        where = hub.describe_endpoint(config.endpoint)
        if config.dry_run:
            mode = "dry run: uploads nothing"
        else:
            mode = "private" if config.private else "public"
        return f"to {config.hub} {config.repo_id}@{revision} on {where} ({mode})"

    def cache_inputs(self, config: PublishConfig) -> list[Path]:
        return []  # the model directory comes from upstream (its digest is in the key)

    def estimate(
        self, config: PublishConfig, upstream: ModelShape | None, machine: Machine
    ) -> Estimate | None:
        from gcupipe.estimate import Estimate

        # the bundle links the model's files (no copy); the hub client streams each file
        basis = "the bundle links the model's files; upload time depends on the network"
        return Estimate(1 << 20, 300_000_000, None, None, basis)

    def run(self, config: PublishConfig, ctx: StageContext) -> PublishOutputs:
        hub = hub_module(config.hub)
        model_dir = config.model or ctx.upstream_model_dir("publish")
        failed = [
            stage_id
            for stage_id, outputs in ctx.upstream.items()
            if getattr(outputs, "passed", True) is False
        ]
        if failed:
            raise StageError(
                f"publish: {', '.join(failed)} did not pass its gates; nothing is published"
            )
        bundle = ctx.output_dir / BUNDLE_DIR
        files = _link_bundle(model_dir, bundle)
        facts = gather(config.repo_id, config.hub, ctx.lineage)
        card = None
        if config.card:
            card = bundle / CARD_NAME
            card.unlink(missing_ok=True)  # the source's own card, copied by quantize
            card.write_text(render(facts), encoding="utf-8")
            files = sorted({*files, CARD_NAME})
        source = ctx.source_model_dir()
        lacking = missing_files(ModelDir(bundle), source, require_tokenizer=True)
        if lacking:
            shown = "; ".join(f"{name} ({why})" for name, why in lacking)
            raise StageError(
                f"publish: the bundle from {model_dir} is incomplete, nothing was uploaded: "
                f"missing {shown}"
            )
        revision = config.revision or hub.DEFAULT_REVISION
        request = HubPublish(
            repo_id=config.repo_id,
            revision=revision,
            endpoint=hub.endpoint(config.endpoint),
            token=_token(config, hub, ctx),
            private=config.private,
            commit_message=config.commit_message or _commit_message(facts, model_dir),
        )
        shown_endpoint = hub.describe_endpoint(config.endpoint)
        size = sum((bundle / name).stat().st_size for name in files)
        destination = f"{config.hub} {config.repo_id}@{revision} on {shown_endpoint}"
        if config.dry_run:
            for name in files:
                ctx.log(f"would upload {name} ({(bundle / name).stat().st_size} bytes)")
            ctx.log(f"dry run: {len(files)} files, {size / 1e6:.1f} MB to {destination}")
            return PublishOutputs(
                url=hub.repo_url(request),
                revision=revision,
                commit=None,
                committed=False,
                files=files,
                bundle_dir=bundle,
                card=card,
            )
        ctx.log(f"publishing {len(files)} files, {size / 1e6:.1f} MB to {destination}")
        attempts = [0]

        def publish_once() -> Published:
            attempts[0] += 1
            published: Published = hub.publish(request, bundle, files, ctx.log)
            return published

        try:
            published = retry_call(
                publish_once,
                retries=config.retries,
                backoff_s=config.retry_backoff_s,
                log=ctx.log,
                what=f"publish to {config.repo_id}",
            )
        except Exception as exc:
            raise hub_stage_error(
                exc,
                hub=config.hub,
                repo_id=config.repo_id,
                revision=revision,
                endpoint=shown_endpoint,
                token_env=config.token_env or hub.TOKEN_ENV,
                offline=False,
                cache_dir="",
                attempts=attempts[0],
                action="publish",
            ) from None
        if published.committed:
            ctx.log(f"committed {published.commit} to {destination}")
        else:
            at = f" at {published.commit}" if published.commit else ""
            ctx.log(f"{destination} already holds these {len(files)} files{at}: no new commit")
        return PublishOutputs(
            url=published.url,
            revision=revision,
            commit=published.commit,
            committed=published.committed,
            files=files,
            bundle_dir=bundle,
            card=card,
        )


def _link_bundle(model_dir: Path, bundle: Path) -> list[str]:
    """The bundle directory: a link to every file of the model (nothing copied)."""
    names = model_files(model_dir)
    for name in names:
        target = bundle / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((model_dir / name).resolve())
    return names


def _token(config: PublishConfig, hub: ModuleType, ctx: StageContext) -> str | None:
    token_env = config.token_env or hub.TOKEN_ENV
    token = os.environ.get(token_env) or None
    if token:
        ctx.secrets(token)
    else:
        ctx.log(f"${token_env} is not set: publishing without a token (the hub will refuse)")
    return token


def _commit_message(facts: CardFacts, model_dir: Path) -> str:
    if facts.quantize is None:
        return f"gcupipe: publish {model_dir.name}"
    outputs = facts.quantize.outputs
    source = (
        facts.download.outputs.get("source") if facts.download else outputs.get("source_model_dir")
    )
    return (
        f"gcupipe: {outputs.get('method')} ({outputs.get('format')}) for "
        f"{outputs.get('target')} from {source}"
    )
