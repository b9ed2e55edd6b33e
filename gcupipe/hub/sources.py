"""The two hub clients by source name, and the settings every fetch from them shares."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from gcupipe.hub import huggingface, modelscope


def hub_module(source: str) -> ModuleType:
    """gcupipe's wrapper of the `modelscope` or `huggingface` client."""
    return modelscope if source == "modelscope" else huggingface


def hub_cache_dir(source: str, gcupipe_cache: Path) -> Path:
    """The client's cache: its environment variable when set ($MODELSCOPE_CACHE, $HF_HUB_CACHE,
    $HF_HOME), else <gcupipe cache>/hub/<source>, shared by model and dataset fetches."""
    return hub_module(source).env_cache_dir() or gcupipe_cache / "hub" / source


def hub_offline(source: str, configured: bool) -> bool:
    """Offline when the recipe says so, or for Hugging Face when $HF_HUB_OFFLINE is set."""
    return configured or (source == "huggingface" and huggingface.env_offline())
