"""vLLM general plugin: makes `quantization="gcu"` load gcupipe's modelslim artifacts.

vLLM calls `register()` in every process it starts (entry point group
`vllm.general_plugins`), so the import of vLLM happens there and never when gcupipe itself is
imported.
"""

from __future__ import annotations

from gcupipe.vllm_plugin.settings import LOW_MEMORY_ENV, QUANTIZATION_NAME

__all__ = ["LOW_MEMORY_ENV", "QUANTIZATION_NAME", "register"]


def register() -> None:
    """Register the "gcu" quantization config with the running vLLM (idempotent)."""
    from vllm.model_executor.layers import quantization

    from gcupipe.vllm_plugin.config import GcuQuantConfig

    registered = getattr(quantization, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {})
    if registered.get(QUANTIZATION_NAME) is GcuQuantConfig:
        return
    quantization.register_quantization_config(QUANTIZATION_NAME)(GcuQuantConfig)
