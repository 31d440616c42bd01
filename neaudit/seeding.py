"""One way to turn seeds into random generators, used everywhere in neaudit.

Every random draw is keyed by what it is for: ``derive_seed(seed, "task", key, shard)``
hashes the parts' text (joined by ``:``) with BLAKE2b into a 63-bit integer. The same parts
give the same seed in every process, on every platform and in every batch composition, and
different purposes never share a stream. A secret key passed as a part keeps its entropy (up
to 63 bits), unlike arithmetic on seeds.
"""

from __future__ import annotations

import hashlib
import math
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


# --- Counter-based noise: the same numbers on every device and in every batch --------------

_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # lowbias32's multipliers, as int32


def _shift_(x: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int32 values holding uint32 bit patterns, into ``out``."""
    return torch.bitwise_right_shift(x, bits, out=out).bitwise_and_((1 << (32 - bits)) - 1)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (a 32-bit integer hash with low bias) in int32 tensor ops, in place (one
    temporary for the whole hash: the noise of a batch is millions of values); multiplication
    wraps modulo 2³² the same way on every device."""
    shifted = torch.empty_like(x)
    x.bitwise_xor_(_shift_(x, 16, shifted)).mul_(_MIX1)
    x.bitwise_xor_(_shift_(x, 15, shifted)).mul_(_MIX2)
    return x.bitwise_xor_(_shift_(x, 16, shifted))


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def counter_uniform(key: int, rows: torch.Tensor, count: int, stream: int = 0
                    ) -> torch.Tensor:
    """(len(rows), count) uniforms in (0, 1], a pure function of (key, stream, row, column):
    computed where ``rows`` lives, with no generator state, so a row (an image index) gets the
    same numbers whatever batch it is in and on whichever device."""
    device = rows.device
    seed = torch.tensor([_int32(key), _int32(key >> 32), _int32(stream)], dtype=torch.int32,
                        device=device)
    head = _mix_(_mix_(_mix_(seed[0].clone()) ^ seed[1]) ^ seed[2])
    per_row = _mix_(head ^ rows.to(torch.int32))
    per_column = _mix_(torch.arange(count, dtype=torch.int32, device=device))
    bits = _mix_(per_row[:, None] ^ per_column[None, :])
    return _shift_(bits, 8, bits).float().add_(1.0).mul_(2.0**-24)


def counter_normal(key: int, rows: torch.Tensor, count: int, stream: int = 0
                   ) -> torch.Tensor:
    """(len(rows), count) standard normals by Box–Muller on :func:`counter_uniform`. Integer
    hashing is bit-identical across devices; log/cos may differ in the last float bit
    between CPU and GPU libraries."""
    half = (count + 1) // 2
    radius = counter_uniform(key, rows, half, 2 * stream).log_().mul_(-2.0).sqrt_()
    angle = counter_uniform(key, rows, half, 2 * stream + 1).mul_(2 * math.pi)
    return torch.cat([torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)],
                     dim=1)[:, :count]
