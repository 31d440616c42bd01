"""Attack suites: TOML playbooks listing attacks and strengths.

Each ``[[attack]]`` table names a registered attack; every other key is a parameter, and a
list of values expands into one entry per value (the Cartesian product across parameters)::

    [[attack]]
    name = "jpeg"
    quality = [90, 75, 50]

The built-in suites live in the repository's ``attacks/`` folder, installed with the wheel as
``neaudit.suites``; a suite is named by its stem (``smoke``) or given as a path.
Validation happens before any work: an unknown attack or parameter fails, listing what is valid.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path

from neaudit.attacks.registry import Attack, get_attack
from neaudit.errors import NeauditError


@dataclass(frozen=True)
class SuiteEntry:
    """One attack at one strength, as the engine runs it."""

    attack: str
    params: tuple[tuple[str, object], ...]

    @property
    def label(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.attack}({inner})" if inner else self.attack

    @property
    def key(self) -> str:
        """Filename-safe identifier."""
        return "-".join([self.attack] + [f"{k}={v}" for k, v in self.params])

    @property
    def registered(self) -> Attack:
        """The registered attack."""
        return get_attack(self.attack)

    @property
    def family(self) -> str:
        return self.registered.family

    @property
    def threat(self) -> str:
        return self.registered.threat

    @property
    def kind(self) -> str:
        return self.registered.kind


def builtin_suites_dir() -> Path:
    """``neaudit/suites`` in an installed wheel, else the checkout's ``attacks/`` folder."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "suites"
    return installed if installed.is_dir() else package.parent / "attacks"


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in builtin_suites_dir().glob("*.toml"))


def load_suite(suite: str | Path) -> list[SuiteEntry]:
    """Load and validate a suite by built-in name or path."""
    path = Path(suite)
    if not path.is_file():
        path = builtin_suites_dir() / f"{suite}.toml"
        if not path.is_file():
            raise NeauditError(f"unknown suite '{suite}'. Fix: use one of "
                               f"{', '.join(builtin_suites())} or a path to a TOML file.")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise NeauditError(f"{path}: not valid TOML ({exc}).") from exc
    tables = spec.get("attack", [])
    if not tables:
        raise NeauditError(f"{path}: no [[attack]] tables. Fix: list at least one attack.")
    entries: list[SuiteEntry] = []
    for table in tables:
        table = dict(table)
        name = table.pop("name", None)
        if name is None:
            raise NeauditError(f"{path}: an [[attack]] table has no 'name'.")
        defaults = get_attack(name).defaults
        unknown = sorted(set(table) - set(defaults))
        if unknown:
            raise NeauditError(
                f"{path}: attack '{name}' has no parameter {', '.join(map(repr, unknown))}. "
                f"Valid parameters: {', '.join(defaults) or '(none)'}.")
        keys = sorted(table)
        # a list runs one entry per value, unless the parameter itself takes a list
        values = [[tuple(v)] if isinstance(defaults[k], list) else v if isinstance(v, list)
                  else [v] for k, v in ((k, table[k]) for k in keys)]
        for combo in itertools.product(*values):
            entries.append(SuiteEntry(name, tuple(zip(keys, combo, strict=True))))
    return list(dict.fromkeys(entries))
