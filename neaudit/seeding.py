"""One way to turn seeds into random generators, used everywhere in neaudit.

Every random draw is keyed by what it is for: ``derive_seed(seed, "task", key, shard)``
hashes the parts' text (joined by ``:``) with BLAKE2b into a 63-bit integer. The same parts
give the same seed in every process, on every platform and in every batch composition, and
different purposes never share a stream. A secret key passed as a part keeps its entropy (up
to 63 bits), unlike arithmetic on seeds; ``derive_key`` keeps up to 256 bits, for the NE noise,
which is the ChaCha8 keystream under that key (:func:`counter_uniform`): counter-based, so an
image gets the same noise on every device and in every batch, and every key bit reaches it.
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

CHACHA_ROUNDS = 8
"""Rounds of the ChaCha block function behind the NE noise: ChaCha8, the round count of Go's
cryptographic ``ChaCha8Rand`` (published attacks reach 7 rounds, with far more work than a
search of a 128-bit key; RFC 8439's 20 rounds add margin at 2.5 times the cost, and 12
rounds made the noise 1.3 times as slow here, on 2 cores)."""

NOISE_GENERATOR = f"chacha{CHACHA_ROUNDS}"
"""The name ``protect`` records for this generator (``neaudit.json``: ``noise_generator``)."""

MIN_KEY_BITS = 56
"""Below this many bits a given noise key can be searched: at a microsecond a candidate on a
GPU, 2⁴⁸ keys take a thousand GPUs three days, 2⁵⁶ two thousand GPU-years. ``protect``
records a given key's bit length (``key_bits``), and the audit flags a short one
(``exposed_key``)."""

_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _shift_(x: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Logical right shift of int32 values holding uint32 bit patterns, into ``out``."""
    return torch.bitwise_right_shift(x, bits, out=out).bitwise_and_((1 << (32 - bits)) - 1)


def _rotate_(x: torch.Tensor, bits: int, spare: torch.Tensor) -> None:
    """Rotate the uint32 bit patterns held in int32 ``x`` left by ``bits``, in place."""
    _shift_(x, 32 - bits, spare)
    x.bitwise_left_shift_(bits).bitwise_or_(spare)


def _quarter_rounds_(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                     spare: torch.Tensor) -> None:
    """RFC 8439 §2.1's quarter round on the rows of four blocks of the state at once, in
    place; int32 addition wraps modulo 2³² the same way on every device (the tests hold it to
    the RFC's test vector)."""
    for (x, y, z), bits in zip(((a, b, d), (c, d, b), (a, b, d), (c, d, b)), (16, 12, 8, 7),
                               strict=True):
        x.add_(y)
        z.bitwise_xor_(x)
        _rotate_(z, bits, spare)


def chacha_blocks(key: int, counters: list[torch.Tensor], rounds: int = CHACHA_ROUNDS
                  ) -> torch.Tensor:
    """ChaCha keystream blocks as int32 tensors (uint32 bit patterns): the RFC 8439 block
    function of the 256-bit ``key`` (little-endian words) for each position of the four
    broadcast ``counters`` (state words 12–15), as (…, 16) words in the RFC's order.

    The state is one (16, …) tensor whose four row blocks a, b, c, d take a column round as
    four quarter rounds at once; rolling b, c and d by one, two and three rows turns the
    diagonal round into another column round. A round is then 24 elementwise passes over a
    quarter of the state, not 96 over a sixteenth: a quarter of the kernel launches on a
    GPU."""
    fixed = [_int32(w) for w in (*_SIGMA, *((key >> (32 * i)) & 0xFFFFFFFF for i in range(8)))]
    counters = torch.stack([c.to(torch.int32) for c in torch.broadcast_tensors(*counters)])
    shape, device = counters.shape[1:], counters.device
    start = torch.tensor(fixed, dtype=torch.int32, device=device).view(12, *[1] * len(shape))
    state = torch.cat([start.expand(12, *shape), counters])
    a, b, c, d = state.split(4)
    spare = torch.empty_like(a)
    for _ in range(rounds // 2):
        _quarter_rounds_(a, b, c, d, spare)  # columns
        for block, turn in ((b, 1), (c, 2), (d, 3)):
            block.copy_(block.roll(-turn, 0))
        _quarter_rounds_(a, b, c, d, spare)  # diagonals
        for block, turn in ((b, 1), (c, 2), (d, 3)):
            block.copy_(block.roll(turn, 0))
    state[:12].add_(start)
    state[12:].add_(counters)
    return state.movedim(0, -1)


def derive_key(*parts: object) -> int:
    """A 256-bit key that depends only on ``parts``, as :func:`derive_seed` (BLAKE2b): a
    secret among them keeps its entropy, up to 256 bits."""
    text = ":".join(str(part) for part in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=32).digest(), "little")


def counter_uniform(key: int, rows: torch.Tensor, count: int, stream: int = 0
                    ) -> torch.Tensor:
    """(len(rows), count) uniforms in (0, 1], a pure function of (key, stream, row, column):
    word ``column`` of ChaCha's keystream under ``key`` (256 bits) with row and stream as its
    nonce, computed where ``rows`` lives with no generator state, so a row (an image index)
    gets the same numbers whatever batch it is in and on whichever device. Every bit of the
    key reaches every number: recovering the noise means searching the whole key."""
    device = rows.device
    blocks = torch.arange((count + 15) // 16, dtype=torch.int32, device=device)
    rows = rows.to(torch.int64)
    words = chacha_blocks(key, [blocks[None, :], (rows & 0xFFFFFFFF).to(torch.int32)[:, None],
                                (rows >> 32).to(torch.int32)[:, None],
                                torch.tensor(_int32(stream), device=device)])
    bits = words.reshape(len(rows), -1)[:, :count]
    return _shift_(bits, 8, bits.clone()).float().add_(1.0).mul_(2.0**-24)


def counter_normal(key: int, rows: torch.Tensor, count: int, stream: int = 0
                   ) -> torch.Tensor:
    """(len(rows), count) standard normals by Box–Muller on :func:`counter_uniform` (one
    draw of the stream: radii from its first half, angles from its second). The keystream is
    bit-identical across devices; log/cos may differ in the last float bit between CPU and
    GPU libraries."""
    half = (count + 1) // 2
    uniforms = counter_uniform(key, rows, 2 * half, stream)
    radius = uniforms[:, :half].log().mul_(-2.0).sqrt_()
    angle = uniforms[:, half:].mul_(2 * math.pi)
    return torch.cat([torch.cos(angle).mul_(radius), angle.sin_().mul_(radius)],
                     dim=1)[:, :count]
