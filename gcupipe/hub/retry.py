"""Retry a whole hub fetch with exponential backoff when the failure is a transient one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_TRANSIENT_NAMES = {
    # requests / urllib3 / httpx / modelscope-hub exception class names for network trouble
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Timeout",
    "TimeoutException",
    "ConnectError",
    "ReadError",
    "RemoteProtocolError",
    "ChunkedEncodingError",
    "ProtocolError",
    "IncompleteRead",
    "NetworkError",
    "RequestTimeoutError",
    "ServerError",
    "ProxyError",
    "WriteError",
    "PoolTimeout",
}


def status_code(exc: BaseException) -> int | None:
    """The HTTP status behind an exception (or its causes), when there is one."""
    for link in _chain(exc):
        response = getattr(link, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
        code = getattr(link, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def is_transient(exc: BaseException) -> bool:
    """Network trouble worth another try: connection errors, timeouts, 5xx and 429 answers."""
    code = status_code(exc)
    if code is not None:
        return code >= 500 or code == 429
    if unresolvable(exc):
        return False  # the host name does not resolve: retrying only delays the answer
    return any(type(link).__name__ in _TRANSIENT_NAMES for link in _chain(exc))


def retry_call(
    fn: Callable[[], T],
    *,
    retries: int,
    backoff_s: float,
    log: Callable[[str], None],
    what: str,
    transient: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn`; on a transient error wait backoff_s, 2*backoff_s, ... and call it again.

    The hub clients retry single requests themselves; this outer loop covers what they give
    up on (an endpoint that is briefly down). Files already fetched stay in the client cache,
    so a retry resumes rather than restarts."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not transient(exc):
                raise
            delay = backoff_s * (2**attempt)
            attempt += 1
            log(f"{what}: {type(exc).__name__}, retry {attempt}/{retries} in {delay:.1f} s")
            sleep(delay)


def unresolvable(exc: BaseException) -> bool:
    """DNS failure somewhere in the chain (urllib3 keeps it only in the message)."""
    import socket

    for link in _chain(exc):
        if isinstance(link, socket.gaierror):
            return True
        text = str(link)
        if "Name or service not known" in text or "nodename nor servname" in text:
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in seen:
        seen.append(link)
        link = link.__cause__ or link.__context__
    return seen
