"""Every legal target x method x format, on the tiny Llama, Qwen2 (tied), Mistral and DeepSeek-V2
(MoE + MLA): written for the target, the files hold exactly the parameter set its quantization
classes create (`loader-parameters`) and its kernels' formulas, decoding the raw tensors on
their own, agree with the reference runtime on the sampled layers to 1e-6 of the largest
output in float64 (`loader-numerics`); every other rule passes too, the serve flag included.

What is legal is asked of the profiles (targets/support.py, the README's table); a combination
is quantized once for all the targets that would write it the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gcupipe.formats.modeldir import ModelDir  # noqa: E402
from gcupipe.formats.registry import FORMATS  # noqa: E402
from gcupipe.formats.results import CheckOptions  # noqa: E402
from gcupipe.stages.quantize import QuantizeConfig, QuantizeStage  # noqa: E402
from gcupipe.targets.base import ModelFacts  # noqa: E402
from gcupipe.targets.registry import TARGETS  # noqa: E402
from gcupipe.targets.support import BUILT_IN_FORMATS, KV_ROW, ROWS  # noqa: E402
from gcupipe.testing.tiny_models import tiny_model  # noqa: E402
from gcupipe.validation.rules import check_structure  # noqa: E402
from tests.helpers import calibration, quantize  # noqa: E402

ARCHS = ("llama", "qwen2", "mistral", "deepseek_v2")
GROUPED = {"w4a16": 64, "gptq": 64, "awq": 64}
"""4-bit methods at group size 64: what every 4-bit kernel here takes."""


def _config(source: Path, row: str, fmt: str, target: str, tmp: Path) -> QuantizeConfig:
    method = "w8a8" if row == KV_ROW else row
    extra: dict[str, object] = {}
    if method in GROUPED:
        extra["group_size"] = GROUPED[method]
    if row == KV_ROW:
        extra["kv_cache"] = {"dtype": "int8"}
    if method in ("w8a8", "gptq", "awq") or row == KV_ROW:
        extra["calibration"] = calibration(tmp)
    return QuantizeConfig.model_validate(
        {"model": source, "method": method, "format": fmt, "target": target, **extra}
    )


def _writes_as(config: QuantizeConfig, facts: ModelFacts) -> tuple[object, ...]:
    """What makes two targets' files differ: how activations and the KV cache are calibrated
    and what the writer is told."""
    target, fmt = config.target_profile, config.layout
    return (
        config.method,
        fmt.name,
        config.kv_cache is not None,
        fmt.symmetric_activations or target.static_activations_symmetric(fmt.name),
        target.kv_cache_symmetric(fmt.name, config.method) if config.kv_cache else None,
        target.write_options(fmt.name, facts),
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_legal_combination_passes_the_targets_loader_emulation(
    arch: str, tmp_path: Path
) -> None:
    source = tiny_model(arch, tmp_path / "src")
    facts = ModelFacts.from_config(ModelDir(source).config or {})
    written: dict[tuple[object, ...], Path] = {}
    checked, failures = [], []
    for target in TARGETS.names():
        for row in ROWS:
            for fmt in BUILT_IN_FORMATS:
                config = _config(source, row, fmt, target, tmp_path)
                if QuantizeStage().check(config):
                    continue  # refused at lint (test_findings and the table say why)
                key = _writes_as(config, facts)
                if key not in written:
                    out = tmp_path / f"q{len(written)}"
                    settings = config.model_dump(exclude={"model"}, exclude_none=True)
                    written[key] = quantize(source, out, **settings)
                md = ModelDir(written[key])
                flag = TARGETS.get(target).quantization(md, FORMATS.get(fmt)).value
                options = CheckOptions(quantization=flag, check_quantization=True, target=target)
                results = {r.rule: r for r in check_structure(md, options)}
                case = f"{target} {row} {fmt}"
                checked.append(case)
                failures += [f"{case}: {r.rule}: {r.message}" for r in results.values() if r.failed]
                emulated = TARGETS.get(target).expected(md, FORMATS.get(fmt), facts)
                for rule in ("loader-parameters", "loader-numerics"):
                    if emulated and results[rule].status != "pass":
                        failures.append(f"{case}: {rule} did not run: {results[rule].message}")
    assert failures == []
    assert len(checked) >= (30 if arch == "deepseek_v2" else 50), checked  # the table's share
