"""The plugin's name in vLLM and its one switch (read in vLLM's processes, set by the caller)."""

QUANTIZATION_NAME = "gcu"

LOW_MEMORY_ENV = "GCUPIPE_VLLM_LOW_MEMORY"
"""Set to 1 to keep W8A16/W4A16 weights as integers and dequantize at every call (4x less weight
memory, several times slower on CPU). Default: dequantize once at load; the numbers are equal."""
