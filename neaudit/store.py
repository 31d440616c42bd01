"""The results store of one audit run: one JSON file per finished task, written atomically.

Re-running the same audit finds the finished tasks here and skips them, so a run killed at
any point resumes and ends with the same table. Everything stored is plain JSON or ``.npz``
arrays (no pickle).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from neaudit.errors import NeauditError
from neaudit.imageio import atomic_write


class ResultStore:
    def __init__(self, root: Path, config: dict) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.json"
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        if config_path.is_file():
            if json.loads(config_path.read_text()) != json.loads(text):
                raise NeauditError(
                    f"{self.root} holds results of a different audit (other data, models, suite "
                    "or seed). Fix: choose another --out, or delete that folder to start over.")
        else:
            self.write_text("config.json", text)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.root / name, lambda h: h.write(text.encode()))

    def done(self, key: str) -> bool:
        return (self.tasks_dir / f"{key}.json").is_file()

    def save(self, key: str, record: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """Arrays first, record last: a record on disk means the task is complete."""
        if arrays:
            def write(handle: io.BufferedWriter) -> None:
                np.savez(handle, **arrays)

            atomic_write(self.tasks_dir / f"{key}.npz", write)
        text = json.dumps(record, sort_keys=True)
        atomic_write(self.tasks_dir / f"{key}.json", lambda h: h.write(text.encode()))

    def load_arrays(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.tasks_dir / f"{key}.npz", allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.tasks_dir.glob("*.json"))]


class ScratchStore:
    """A store that keeps new records in memory and reads arrays from a real store: used to
    re-run tasks for the nondeterminism check without touching the results."""

    def __init__(self, backing: ResultStore) -> None:
        self.root = backing.root
        self.backing = backing
        self.saved: dict[str, dict] = {}

    def done(self, key: str) -> bool:
        return False

    def save(self, key: str, record: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.saved[key] = record

    def load_arrays(self, key: str) -> dict[str, np.ndarray]:
        return self.backing.load_arrays(key)

    def record(self, key: str) -> dict:
        return json.loads((self.backing.tasks_dir / f"{key}.json").read_text())
