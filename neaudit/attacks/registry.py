"""The attack registry: every attack is registered once, with its family, threat level and
parameters, and suites and the engine know it by name.

An attack is a pure function ``fn(images, ctx, **params) -> images`` on float NCHW batches in
[0, 1]; it must return a batch of the same shape in [0, 1], be batched (no per-image Python
loops where torch/Kornia can do the batch), and draw randomness only from ``ctx.generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neaudit.errors import NeauditError

FAMILIES = ("preprocess", "purify", "adaptive", "test")
THREAT_LEVELS = {
    "L0": "preprocessing an ordinary pipeline applies",
    "L1": "protected data only",
    "L2": "plus clean in-distribution data",
    "L3": "plus a zoo of public models",
    "learning": "labels, and training on the protected data",
}


@dataclass
class AttackContext:
    """What an attack may use besides the images.

    ``reference`` holds clean in-distribution images the attacker owns (L2); ``originals`` the
    clean originals of the current batch, for oracle attacks in tests only.
    """

    generator: torch.Generator
    device: torch.device = torch.device("cpu")
    reference: torch.Tensor | None = None
    originals: torch.Tensor | None = None
    cache_dir: Path | None = None
    extras: dict = field(default_factory=dict)


AttackFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Attack:
    name: str
    family: str
    threat: str
    fn: AttackFn
    defaults: dict[str, object]
    grid: dict[str, list]
    doc: str

    def __call__(self, images: torch.Tensor, ctx: AttackContext, **params) -> torch.Tensor:
        merged = {**self.defaults, **params}
        return self.fn(images, ctx, **merged).clamp(0, 1)


ATTACKS: dict[str, Attack] = {}


def register_attack(name: str, family: str, threat: str, defaults: dict[str, object],
                    grid: dict[str, list] | None = None) -> Callable[[AttackFn], AttackFn]:
    """Register ``fn`` under ``name``; the same function may be registered under several names
    (e.g. JPEG as a preprocessing step and as a purification)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    if threat not in THREAT_LEVELS:
        raise ValueError(f"threat must be one of {tuple(THREAT_LEVELS)}")

    def decorate(fn: AttackFn) -> AttackFn:
        ATTACKS[name] = Attack(name, family, threat, fn, dict(defaults),
                               dict(grid or {k: [v] for k, v in defaults.items()}),
                               (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorate


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        from neaudit.learning import LEARNING

        valid = sorted([*ATTACKS, *LEARNING])
        raise NeauditError(f"unknown attack '{name}'. Valid attacks: {', '.join(valid)}.")
    return ATTACKS[name]
