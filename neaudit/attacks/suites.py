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

import hashlib
import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePath

from neaudit.attacks.registry import Attack, get_attack
from neaudit.errors import NeauditError


@dataclass(frozen=True)
class SuiteEntry:
    """One attack at one strength, as the engine runs it."""

    attack: str
    params: tuple[tuple[str, object], ...]

    @property
    def label(self) -> str:
        """What people read: folder parameters by their name and a short hash."""
        inner = ", ".join(f"{k}={_short(v)}" for k, v in self.params)
        return f"{self.attack}({inner})" if inner else self.attack

    @property
    def key(self) -> str:
        """Filename-safe identifier."""
        return "-".join([self.attack] + [f"{k}={_digest(v) if isinstance(v, str) else v}"
                                         for k, v in self.params])

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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _short(value: object) -> object:
    """A folder parameter as ``name@hash`` (two folders of one name stay apart)."""
    if not isinstance(value, str):
        return value
    return f"{PurePath(value).name}@{_digest(value)[:6]}" if value else '""'


def builtin_suites_dir() -> Path:
    """``neaudit/suites`` in an installed wheel, else the checkout's ``attacks/`` folder."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "suites"
    return installed if installed.is_dir() else package.parent / "attacks"


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in builtin_suites_dir().glob("*.toml"))


def load_suite(suite: str | Path) -> list[SuiteEntry]:
    """Load and validate a suite by built-in name or path: every attack known, every
    parameter typed and in range, before any work."""
    path = _suite_path(suite)
    try:
        spec = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise NeauditError(f"{path}: not valid TOML ({exc}). Fix: correct it there.") from exc
    except OSError as exc:
        raise NeauditError(f"{path}: cannot read this suite ({exc.strerror}). Fix: check the "
                           f"path, or name a shipped suite ({', '.join(builtin_suites())})."
                           ) from exc
    unknown = sorted(set(spec) - {"attack", "description"})
    if unknown:
        raise NeauditError(f"{path}: unknown key(s) {', '.join(unknown)}. Fix: a suite holds "
                           "a description and [[attack]] tables.")
    tables = spec.get("attack", [])
    if not isinstance(tables, list) or not tables:
        raise NeauditError(f"{path}: no [[attack]] tables. Fix: list at least one attack as "
                           "[[attack]] with name = \"...\".")
    entries: list[SuiteEntry] = []
    for table in tables:
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str):
            raise NeauditError(f"{path}: an [[attack]] table has no 'name' string.")
        try:
            attack = get_attack(name)
        except NeauditError as exc:
            raise NeauditError(f"{path}: {exc}") from None
        entries += _expand(path, attack, table)
    return list(dict.fromkeys(entries))


def _suite_path(suite: str | Path) -> Path:
    path = Path(suite)
    if path.is_file():
        return path
    builtin = builtin_suites_dir() / f"{suite}.toml"
    if builtin.is_file():
        return builtin
    raise NeauditError(f"unknown suite '{suite}'. Fix: use one of "
                       f"{', '.join(builtin_suites())} or a path to a TOML file.")


def _expand(path: Path, attack: Attack, table: dict) -> list[SuiteEntry]:
    """One entry per combination of listed values (a list runs one entry per value, unless
    the parameter itself takes a list), each checked against the attack's schema."""
    keys = sorted(table)
    values = []
    for key in keys:
        value = table[key]
        if key in attack.params and attack.params[key].path and isinstance(value, str) and value:
            value = str(path.parent / value)  # relative to the suite's own folder
        takes_list = key in attack.params and isinstance(attack.params[key].default, list)
        if isinstance(value, list) and not value:
            raise NeauditError(f"{path}: attack '{attack.name}': {key} = [] lists no value. "
                               "Fix: give at least one value.")
        values.append([value] if takes_list or not isinstance(value, list) else value)
    entries = []
    for combo in itertools.product(*values):
        try:
            checked = attack.check_params(dict(zip(keys, combo, strict=True)))
        except NeauditError as exc:
            raise NeauditError(f"{path}: {exc}") from None
        params = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in checked.items())
        entries.append(SuiteEntry(attack.name, params))
    return entries
