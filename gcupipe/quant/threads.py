"""How many CPU threads torch's ops use while quantizing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: what a container or taskset
    allows, not the machine's count)."""
    return len(os.sched_getaffinity(0))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` (at least 1) inside the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def streaming_threads() -> int:
    """Threads for rounding while a stream reads ahead and writes in the background: all cores
    but one, which the read-ahead and the shard writer (writing, hashing) keep busy.
    Oversubscribed, the rounding threads stall at every op's barrier whenever the writer holds
    a core (6.2 GB warm on 2 cores: 20.5 s with 2 threads, 17.1 s with 1)."""
    import torch

    return min(torch.get_num_threads(), available_cores() - 1)
