"""The audit plan: a list of independent, serializable tasks.

A task is one attack on one shard (a batch of images) for every model, so each attacked batch
is shared by all models; a ``dataset`` attack (learning) is one task over the whole dataset.
A shard's ``clean`` task (originals) comes before its other tasks: label-free ``agreement``
is scored against the clean predictions it records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from neaudit.attacks import BATCH, CLEAN, DATASET, NONE, SuiteEntry, get_attack
from neaudit.dataset import ImageDataset


@dataclass(frozen=True)
class Task:
    """One unit of work: an attack (or ``clean``/``none``) on items [start, stop)."""

    attack: str
    params: tuple[tuple[str, object], ...]
    label: str
    key: str
    shard: int
    start: int
    stop: int

    @property
    def task_id(self) -> str:
        return f"{self.key}__{self.shard:06d}"

    @property
    def is_reference(self) -> bool:
        """``clean`` or ``none``: a condition measured, not an attack applied."""
        return self.attack in (CLEAN, NONE)

    @property
    def kind(self) -> str:
        return BATCH if self.is_reference else get_attack(self.attack).kind


def plan(dataset: ImageDataset, entries: Sequence[SuiteEntry], batch_size: int) -> list[Task]:
    """Shard by shard, each shard's clean task first (it feeds agreement), then its other
    batch attacks, so every shard is read once; then the dataset attacks, which each need the
    whole dataset."""
    count = len(dataset)
    shards = [(i, lo, min(lo + batch_size, count))
              for i, lo in enumerate(range(0, count, batch_size))]
    heads = [(CLEAN, (), CLEAN, CLEAN)] if dataset.has_originals else []
    heads.append((NONE, (), NONE, NONE))
    attacks = heads + [(e.attack, e.params, e.label, e.key) for e in entries
                       if e.kind == BATCH]
    tasks = [Task(a, p, label, key, i, lo, hi) for (i, lo, hi) in shards
             for (a, p, label, key) in attacks]
    tasks = sorted(tasks, key=lambda t: (t.shard, t.attack != CLEAN))
    return tasks + [Task(e.attack, e.params, e.label, e.key, 0, 0, count)
                    for e in entries if e.kind == DATASET]
