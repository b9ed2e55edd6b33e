"""sha256 of files, remembered by whoever wrote them.

The engine digests every stage output (engine/digest.py); reading a 16 GB quantized model back
from disk only to hash it costs as long as writing it did. A writer that hashed the bytes on
their way out records the digest on the file itself, in the extended attribute
`user.gcupipe.sha256` together with the size and mtime it had; `sha256_file` trusts that record
only while both still match, and reads the file otherwise (also where the file system keeps no
extended attributes).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_ATTRIBUTE = "user.gcupipe.sha256"
_CHUNK = 1 << 20


def _identity(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def remember_sha256(path: Path, hexdigest: str) -> None:
    """Record the sha256 of the file just written (a no-op where attributes are unsupported)."""
    try:
        os.setxattr(path, _ATTRIBUTE, f"{_identity(path)}:{hexdigest}".encode())
    except (OSError, AttributeError):
        pass


def sha256_file(path: Path) -> str:
    try:
        size, mtime, hexdigest = os.getxattr(path, _ATTRIBUTE).decode().split(":")
        if f"{size}:{mtime}" == _identity(path):
            return hexdigest
    except (OSError, AttributeError, ValueError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
