"""The results store of one audit run: one JSON file per finished task, written atomically,
and the run's outputs beside them (the tidy table, ``run.json``).

Re-running the same audit finds the finished tasks here and skips them, so a run killed at
any point resumes and ends with the same table. Everything stored is plain JSON, Parquet/CSV
or ``.npz`` arrays (no pickle).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from neaudit._version import __version__
from neaudit.errors import NeauditError
from neaudit.imageio import atomic_write
from neaudit.paths import OutputTree


def run_folders(root: Path) -> tuple[Path, Path]:
    """A run's ``tasks/`` (finished tasks) and ``.cache/`` (networks that trained attacks
    reuse when the run resumes), refused if either is a link out of ``root``; the audit checks
    them before any work, the store again where it runs."""
    tree = OutputTree(root, root)
    return Path(tree.folder("tasks")), Path(tree.folder(".cache"))


class ResultStore:
    """One run's folder: its finished tasks, its cache and its outputs (:func:`run_folders`)."""

    def __init__(self, root: Path, config: dict) -> None:
        self.root = Path(root)
        self.tasks_dir, self.cache_dir = run_folders(self.root)
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.json"
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        if config_path.is_file():
            stored, wanted = json.loads(config_path.read_text()), json.loads(text)
            if stored != wanted:
                differing = sorted(k for k in stored.keys() | wanted.keys()
                                   if stored.get(k) != wanted.get(k))
                raise NeauditError(
                    f"{self.root} holds results of a different audit (settings that differ: "
                    f"{', '.join(differing)}). Fix: choose another --out, or delete that folder "
                    "to start over.")
        else:
            self.write_text("config.json", text)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.root / name, lambda h: h.write(text.encode()))

    def done(self, key: str) -> bool:
        return (self.tasks_dir / f"{key}.json").is_file()

    def finished(self) -> set[str]:
        """The keys of every finished task, from one listing (an ImageNet audit has half a
        million tasks: a ``stat`` each took seconds)."""
        return {name[:-5] for name in os.listdir(self.tasks_dir) if name.endswith(".json")}

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


def write_table(root: Path, table: pd.DataFrame) -> None:
    """``results.csv`` and ``results.parquet``, each replaced atomically."""
    atomic_write(root / "results.csv", lambda h: table.to_csv(h, index=False))
    atomic_write(root / "results.parquet", lambda h: table.to_parquet(h, index=False))


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """A short digest of a model's state dict: which weights a figure was measured with
    (SHA-256 over the raw bytes, read in place, its first 16 hex digits; the tensors must stay
    unchanged until it returns, so take ``model.state_dict()`` before moving the model).
    SHA-256 rather than BLAKE2b: with the SHA extensions of current x86 and ARM cores it
    hashed 1,165–1,186 against 795–839 MB/s here, and the audit hashes its zoo while it works."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        tensor = tensor.detach().cpu()
        if tensor.layout != torch.strided:  # sparse weights: their dense values
            tensor = tensor.to_dense()
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def write_run_manifest(store: ResultStore, *, command: str, config: dict, complete: bool,
                       device: torch.device, source: str, count: int, outside_files: int,
                       weights: dict[str, str], seconds: float,
                       phases: dict[str, float] | None = None) -> None:
    """``run.json``: the provenance of a run (command, config, versions, weights, device),
    and the seconds it spent in each phase (``setup``: models and data; ``tasks``: attacks
    and forwards; ``finish``: table, validity checks and evidence)."""
    import kornia
    import open_clip
    import timm

    manifest = {
        "command": command,
        "config": config,
        "seed": config["seed"],
        "complete": complete,
        "versions": {"neaudit": __version__, "torch": torch.__version__,
                     "timm": timm.__version__, "open_clip": open_clip.__version__,
                     "kornia": kornia.__version__, "python": platform.python_version()},
        "device": str(device),
        "dataset": {"source": source, "hash": config["dataset"], "count": count,
                    "outside_files": outside_files},
        "weights": weights,
        "seconds": seconds,
        "phases": phases or {},
    }
    store.write_text("run.json", json.dumps(manifest, indent=2, default=json_default))


def json_default(value: object) -> object:
    """JSON for numpy/torch scalars and dataclasses; anything else as its text."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
