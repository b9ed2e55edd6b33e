"""The model card (`README.md`) a publish writes: the hub's YAML front matter, then how the
model was made, how to serve it and how accurate it is, from the records of the stages that
made it (the run's lineage) and the validate report. Nothing in it depends on when or where
the run happened, so the same artifact always gets the same card (and a second publish of it
no new commit)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gcupipe.serving.args import VllmArgs
from gcupipe.stages.base import Provenance
from gcupipe.targets.registry import TARGETS
from gcupipe.validation.report import accuracy_sections
from gcupipe.versions import package_versions

CARD_NAME = "README.md"


@dataclass(frozen=True)
class CardFacts:
    """What the card says, gathered from the lineage; tests read the card against these."""

    repo_id: str
    hub: str
    download: Provenance | None
    quantize: Provenance | None
    validate: Provenance | None
    report: dict[str, Any] | None
    evaluation: dict[str, Any] | None  # the evaluate stage's report (lm-eval task accuracy)
    source_license: str | None
    lineage_digest: str


def gather(repo_id: str, hub: str, lineage: list[Provenance]) -> CardFacts:
    def last(uses: str) -> Provenance | None:
        return next((p for p in reversed(lineage) if p.uses == uses), None)

    validate = last("validate")
    report = None
    if validate is not None and validate.outputs.get("report_json"):
        report = json.loads(Path(validate.outputs["report_json"]).read_text())
    evaluate = last("evaluate")
    evaluation = None
    if evaluate is not None and evaluate.outputs.get("report_json"):
        evaluation = json.loads(Path(evaluate.outputs["report_json"]).read_text())
    download = last("download")
    source_dir = Path(download.outputs["model_dir"]) if download else None
    return CardFacts(
        repo_id,
        hub,
        download,
        last("quantize"),
        validate,
        report,
        evaluation,
        source_license(source_dir) if source_dir else None,
        json_digest([[p.stage_id, p.cache_key] for p in lineage]),
    )


def json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def source_license(model_dir: Path) -> str | None:
    """The license the source declares: its card's front matter, else `other` for a license
    file of its own."""
    front = front_matter(model_dir / CARD_NAME)
    if isinstance(front.get("license"), str):
        return str(front["license"])
    if any((model_dir / name).is_file() for name in ("LICENSE", "LICENSE.txt", "LICENSE.md")):
        return "other"
    return None


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML block between the leading `---` lines of a card; {} when it has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def serve_args(facts: CardFacts) -> VllmArgs:
    outputs = facts.quantize.outputs if facts.quantize else {}
    kv = None
    if outputs.get("kv_cache_layers"):
        kv = TARGETS.get(outputs["target"]).kv_cache_dtype()
    remote_code = bool(facts.download and facts.download.outputs.get("needs_trust_remote_code"))
    return VllmArgs(
        model=facts.repo_id,
        quantization=outputs.get("quantization"),
        kv_cache_dtype=kv,
        trust_remote_code=remote_code,
    )


def render(facts: CardFacts) -> str:
    quantize = facts.quantize
    qconfig = quantize.config if quantize else {}
    qout = quantize.outputs if quantize else {}
    method, layout, target = qout.get("method"), qout.get("format"), qout.get("target")
    front: dict[str, Any] = {}
    if facts.download and facts.download.config.get("source") in ("huggingface", "modelscope"):
        front["base_model"] = facts.download.config.get("model_id")
    if facts.source_license:
        front["license"] = facts.source_license
    front["library_name"] = "vllm"
    front["pipeline_tag"] = "text-generation"
    if facts.hub == "modelscope":
        front["tasks"] = ["text-generation"]
        front["frameworks"] = ["pytorch"]
    front["tags"] = [
        tag
        for tag in ("gcupipe", "quantized", method, layout, target and f"target-{target}")
        if tag
    ]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {facts.repo_id}",
        "",
    ]
    if quantize:
        summary = TARGETS.get(str(target)).summary if target in TARGETS else target
        lines += [
            f"`{method}` quantization in the `{layout}` layout, for {target} ({summary}), made "
            "with gcupipe from the model below.",
            "",
        ]
    lines += _source(facts) + _quantization(qconfig, qout) + _serving(facts)
    if facts.report is not None:
        verdict = "passed" if facts.report.get("passed") else "FAILED"
        lines += [
            "## Validation",
            "",
            f"Validated against the float model by gcupipe's validate stage: **{verdict}** "
            f"({sum(r['status'] == 'pass' for r in facts.report['rules'])} of "
            f"{len(facts.report['rules'])} structural rules pass).",
            "",
        ]
        lines += accuracy_sections(facts.report["metrics"], heading_level=3)
    if facts.evaluation is not None:
        from gcupipe.stages.evaluate import results_table

        lines += [
            "## Task accuracy",
            "",
            f"lm-eval-harness on the {facts.evaluation['engine']} engine, the float model and "
            "this one on the same documents (± is lm-eval's standard error):",
            "",
            *results_table(facts.evaluation["results"]),
            "",
        ]
    versions = package_versions()
    lines += [
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        *(f"| {name} | {version} |" for name, version in versions.items() if version),
        f"| lineage digest | `{facts.lineage_digest}` |",
        "",
        "The lineage digest covers the cache key of every stage that made this model: its type, "
        "version and settings and the content of what it was given (`gcupipe.lock.json` of the "
        "run lists them).",
        "",
    ]
    return "\n".join(lines)


def _source(facts: CardFacts) -> list[str]:
    if facts.download is None:
        return []
    outputs, config = facts.download.outputs, facts.download.config
    lines = ["## Source", "", f"- model: `{outputs.get('source')}`"]
    if config.get("revision"):
        lines.append(f"- revision asked for: `{config['revision']}`")
    manifest = Path(outputs["manifest"]) if outputs.get("manifest") else None
    if manifest is not None and manifest.is_file():
        files = json.loads(manifest.read_text()).get("files", [])
        total = sum(entry["size"] for entry in files)
        lines.append(
            f"- files: {len(files)}, {total / 1e6:.1f} MB; sha256 of their manifest "
            f"`{json_digest(files)}`"
        )
    if facts.source_license:
        lines.append(f"- license: {facts.source_license} (carried over from the source)")
    return [*lines, ""]


def _quantization(config: dict[str, Any], outputs: dict[str, Any]) -> list[str]:
    if not config:
        return []
    lines = ["## Quantization", "", "| setting | value |", "|---|---|"]
    for key, value in _flatten(config):
        if key in ("model", "target") or value in (None, [], {}):
            continue
        lines.append(f"| `{key}` | `{value}` |")
    calibration = config.get("calibration") or {}
    if calibration.get("samples") and calibration.get("seq_len"):
        tokens = calibration["samples"] * calibration["seq_len"]
        lines += [
            "",
            f"Calibration: {tokens} tokens ({calibration['samples']} x {calibration['seq_len']}).",
        ]
    lines += [
        "",
        f"Quantized layers: {outputs.get('quantized_layers')}; kept in float: "
        f"{len(outputs.get('float_layers') or [])}; int8 KV-cache layers: "
        f"{outputs.get('kv_cache_layers', 0)}.",
        "",
    ]
    return lines


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        return [
            item
            for key, inner in value.items()
            for item in _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
        ]
    return [(prefix, value)]


def _serving(facts: CardFacts) -> list[str]:
    args = serve_args(facts)
    keywords = ", ".join(f"{key}={value!r}" for key, value in args.llm_kwargs().items())
    return [
        "## Serve it with vLLM",
        "",
        "```python",
        "from vllm import LLM",
        f"llm = LLM({keywords})",
        "```",
        "",
        "```bash",
        "vllm serve " + " ".join([args.model, *args.cli()[2:]]),
        "```",
        "",
    ]
