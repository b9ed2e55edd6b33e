"""The quantization core: shared representation, observers, methods, streaming, module maps."""
