"""Model sources for the download stage: ModelScope, Hugging Face, local directories, GGUF files."""
