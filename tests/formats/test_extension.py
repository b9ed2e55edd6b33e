"""Adding an output format or a quantization method is one module plus one registration line.

Both are defined here, in the tests, and registered in-process (a package would list them in
its `gcupipe.formats` / `gcupipe.methods` entry points instead). No other gcupipe file knows
them: the quantize stage writes them, `gcupipe inspect` recognises the format, validate runs its
rule and serve derives its flags, all through the registries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import Field

torch = pytest.importorskip("torch")

from gcupipe.formats.base import (  # noqa: E402
    FormatWriter,
    QuantizedCheckpoint,
    ShardWriter,
    TensorSelector,
    copy_side_files,
    read_tensors,
    strip_quantization_config,
)
from gcupipe.formats.format import Combination, Description, Format, QuantizationFlag  # noqa: E402
from gcupipe.formats.modeldir import ModelDir  # noqa: E402
from gcupipe.formats.registry import FORMATS  # noqa: E402
from gcupipe.formats.results import CheckOptions, Finding, Rule  # noqa: E402
from gcupipe.quant.methods import METHODS, LayerSpec, MethodOptions, QuantMethod  # noqa: E402
from gcupipe.quant.scheme import ActivationScheme, QuantizedLinear  # noqa: E402

MARKER = "dequantized.json"


# -- a test-only format: quantized weights written back as float ------------------------------


class DequantizedWriter(FormatWriter):
    """Every quantized linear as its dequantized float weight, plus a marker naming them."""

    def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.shards = ShardWriter(
            self.out_dir, "model", "model.safetensors.index.json", self.max_shard_bytes
        )
        self.linears: list[str] = []

    def add_float(self, name: str, tensor: torch.Tensor) -> None:
        self.shards.add(name, tensor)

    def add_linear(self, prefix: str, layer: QuantizedLinear) -> None:
        self.shards.add(f"{prefix}.weight", layer.dequantize())
        if layer.bias is not None:
            self.shards.add(f"{prefix}.bias", layer.bias.float())
        self.linears.append(prefix)

    def add_kv_cache(self, attn_prefix, scale, kv_channels) -> None:  # type: ignore[no-untyped-def]
        raise ValueError("no KV cache in a dequantized export")

    def end_layer(self) -> None:
        self.shards.maybe_flush()

    def finish(self, float_linears: Sequence[str] = ()) -> list[str]:
        files = self.shards.finish()
        config = strip_quantization_config(self.source_config)
        (self.out_dir / "config.json").write_text(json.dumps(config))
        marker = {"method": self.method, "dequantized": sorted(self.linears)}
        (self.out_dir / MARKER).write_text(json.dumps(marker))
        copy_side_files(self.source_dir, self.out_dir)
        return files


def _listed_linears_are_float(md: ModelDir, opts: CheckOptions) -> list[Finding]:
    marker = md.json_file(MARKER) or {}
    bad = [
        p
        for p in marker.get("dequantized", [])
        if getattr(md.tensors.get(f"{p}.weight"), "dtype", None) not in ("F32", "F16", "BF16")
    ]
    return [Finding(f"{bad[0]}.weight is missing or not float", "re-export")] if bad else []


class DequantizedFormat(Format):
    name = "safetensors-dequantized"
    summary = "quantized weights dequantized to float safetensors (a test-only format)"
    writer_class = DequantizedWriter
    native_target = "cpu"
    targets = ("gcu", "cuda", "cpu")  # float weights: every vLLM loads them
    required_files = ((MARKER, "write the marker naming the dequantized linears"),)

    def detect(self, md: ModelDir) -> bool:
        return (md.path / MARKER).is_file()

    def read(self, path: Path, select: TensorSelector | None = None) -> QuantizedCheckpoint:
        md = ModelDir(path)
        return QuantizedCheckpoint(
            format=self.name,
            method=self.describe(md).method,
            config=md.config or {},
            float_tensors=read_tensors(md.safetensors_files, select),
        )

    def problems(self, combo: Combination) -> list[tuple[str, str]]:
        if combo.activation is not ActivationScheme.NONE:
            return [("method", "a dequantized export holds weights only")]
        return []

    def quantization_flag(self, md: ModelDir) -> QuantizationFlag:
        return QuantizationFlag(None, frozenset({None}), "float weights (dequantized)")

    def planned_quantization_flag(self, combo: Combination) -> QuantizationFlag:
        return QuantizationFlag(None, frozenset({None}), "float weights (dequantized)")

    def module_types(self, md: ModelDir) -> dict[str, str]:
        return {p: "FLOAT" for p in (md.json_file(MARKER) or {}).get("dequantized", [])}

    def describe(self, md: ModelDir) -> Description:
        return Description(method=str((md.json_file(MARKER) or {}).get("method", "")))

    def rules(self) -> tuple[Rule, ...]:
        return (
            Rule(
                "dequantized-linears-float",
                "the marker's linears are float tensors",
                _listed_linears_are_float,
            ),
        )


# -- a test-only method: RTN with a clipped range ---------------------------------------------


class ClipOptions(MethodOptions):
    clip_ratio: float = Field(default=0.9, gt=0, le=1, description="Share of max|w| kept.")


class ClipRTNMethod(QuantMethod):
    name = "rtn_clip"
    summary = "int8 weights per channel, range clipped to clip_ratio x max|w|"
    Options = ClipOptions

    def quantize_layer(self, name, weight, bias, inputs, spec: LayerSpec) -> QuantizedLinear:  # type: ignore[no-untyped-def]
        assert isinstance(self.options, ClipOptions)
        w = weight.float()
        scale = (w.abs().amax(dim=1, keepdim=True) * self.options.clip_ratio / 127).clamp(min=1e-8)
        q = torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8)
        return QuantizedLinear(
            q,
            scale,
            torch.zeros_like(scale),
            bits=8,
            method=self.name,
            bias=None if bias is None else bias.float(),
        )


@pytest.fixture(autouse=True)
def registered():  # type: ignore[no-untyped-def]
    FORMATS.register("safetensors-dequantized", DequantizedFormat())
    METHODS.register("rtn_clip", ClipRTNMethod)
    yield
    FORMATS._added.pop("safetensors-dequantized")  # leave the registries as they were
    METHODS._added.pop("rtn_clip")


RECIPE = """
version: 1
name: extension
stages:
  quantize:
    uses: quantize
    with:
      model: {model}
      method: {method}
      format: {fmt}
      options: {options}
  validate:
    uses: validate
    with: {{reference: {model}, eval: {{max_tokens: 300, window: 128, stride: 128}},
            agreement_margin: 0.05}}
"""


def _run(tmp_path: Path, method: str, fmt: str, options: str = "{}"):  # type: ignore[no-untyped-def]
    from gcupipe.engine import run_recipe
    from gcupipe.recipe import load_recipe
    from gcupipe.testing.tiny_models import tiny_model

    model = tiny_model("llama", tmp_path / "model")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, method=method, fmt=fmt, options=options))
    return run_recipe(load_recipe(recipe, environ=dict(os.environ)), tmp_path / "run")


def test_a_format_defined_outside_gcupipe_is_written_inspected_validated_and_served(tmp_path):
    from gcupipe.formats.inspect import inspect_model_dir
    from gcupipe.serving.args import derive_quantization, inspect_artifact
    from gcupipe.stages.serve import ServeConfig, ServeStage
    from gcupipe.targets.registry import TARGETS

    result = _run(tmp_path, "w8a16", "safetensors-dequantized")
    assert result.outcome == "ok", result.error
    out = Path(result.outputs("quantize")["model_dir"])
    assert result.outputs("quantize")["format"] == "safetensors-dequantized"
    assert result.outputs("validate")["passed"]
    report = json.loads(Path(result.outputs("validate")["report_json"]).read_text())
    assert "dequantized-linears-float" in {r["rule"] for r in report["rules"]}
    info = inspect_model_dir(out)
    assert (info.format, info.method, info.quantization) == (
        "safetensors-dequantized",
        "w8a16",
        None,
    )
    assert derive_quantization(inspect_artifact(out), TARGETS.get("cpu")) is None
    command = ServeStage().describe(ServeConfig(model=out), tmp_path)
    assert command is not None and "--quantization" not in command
    # the format's own rule sees a broken export
    marker = json.loads((out / MARKER).read_text())
    marker["dequantized"].append("model.layers.0.mlp.nope_proj")
    (out / MARKER).write_text(json.dumps(marker))
    from gcupipe.validation.rules import check_structure

    failed = [r.rule for r in check_structure(ModelDir(out)) if r.failed]
    assert failed == ["dequantized-linears-float"]


def test_the_format_refuses_what_it_cannot_hold_at_lint(tmp_path):
    from gcupipe.errors import RecipeError

    with pytest.raises(RecipeError, match="stages.quantize.with.method: a dequantized export"):
        _run(tmp_path, "w8a8_dynamic", "safetensors-dequantized")


def test_a_method_defined_outside_gcupipe_quantizes_and_its_options_are_checked(tmp_path):
    from gcupipe.errors import RecipeError
    from gcupipe.formats.registry import read_quantized

    result = _run(tmp_path, "rtn_clip", "modelslim", "{clip_ratio: 0.95}")
    assert result.outcome == "ok", result.error
    checkpoint = read_quantized(result.outputs("quantize")["model_dir"])
    layer = checkpoint.linears["model.layers.0.self_attn.q_proj"]
    assert layer.weight.abs().max() == 127  # clipped: the largest weights saturate
    with pytest.raises(RecipeError) as caught:
        _run(tmp_path / "bad", "rtn_clip", "modelslim", "{clip_ratio: 2}")
    message = str(caught.value)
    assert "recipe.yaml:11:" in message and "stages.quantize.with.options.clip_ratio" in message
    with pytest.raises(RecipeError, match="unknown quantization method 'rtn_clp'.*rtn_clip"):
        _run(tmp_path / "typo", "rtn_clp", "modelslim")
