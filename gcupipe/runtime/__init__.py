"""Reference inference on torch: float models and every gcupipe format, perplexity, generation."""
