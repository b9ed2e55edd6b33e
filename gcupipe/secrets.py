"""Secrets (tokens from the environment) and their redaction wherever gcupipe prints or records."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIAL|AUTH", re.I)
_secrets: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Environment variables whose names look like credentials are treated as secrets."""
    return bool(_SECRET_NAME.search(name))


def register_secret(value: str) -> None:
    if len(value) >= 4:  # shorter values would redact ordinary text
        _secrets.add(value)


def redact(value: Any) -> Any:
    """`value` with every registered secret replaced, recursing into dicts and lists."""
    if isinstance(value, str):
        for secret in sorted(_secrets, key=len, reverse=True):
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value
