"""One way to turn seeds into random generators, used everywhere in neaudit.

Every random draw is keyed by what it is for: ``derive_seed(seed, "task", key, shard)``
hashes the parts' text (joined by ``:``) with BLAKE2b into a 63-bit integer. The same parts
give the same seed in every process, on every platform and in every batch composition, and
different purposes never share a stream. A secret key passed as a part keeps its entropy (up
to 63 bits), unlike arithmetic on seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (their ``str``, joined by ``:``)."""
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(*parts)``: draw on the CPU, then move the
    result, so that every device sees the same numbers."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seeded(build: Callable[[], T], *parts: object) -> T:
    """``build()`` with torch's global generator seeded by ``derive_seed(*parts)``, restored
    afterwards: for code that only draws from the global generator (module initializers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(*parts))
        return build()
