"""Local directories as a source, and placing selected files into a stage's model directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gcupipe.errors import StageError


def check_model_dir(path: Path) -> Path:
    """The resolved directory, or one clear error when it is missing or not a directory."""
    path = path.expanduser()
    if not path.exists():
        raise StageError(f"local model directory {path} does not exist: check `path`.")
    if not path.is_dir():
        raise StageError(
            f"local model path {path} is not a directory (a .gguf file needs source: gguf)."
        )
    return path.resolve()


def materialize(src_dir: Path, files: list[str], dest_dir: Path, *, copy: bool) -> None:
    """Put `files` from `src_dir` into `dest_dir`: real copies, or links to the resolved
    originals (cheap, and they keep working when a hub cache swaps its own links)."""
    for rel in files:
        source = (src_dir / rel).resolve()
        target = dest_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if copy:
            shutil.copyfile(source, target)
        else:
            os.symlink(source, target)
