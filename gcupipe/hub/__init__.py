"""Model and dataset sources: ModelScope, Hugging Face, local directories, GGUF files."""
