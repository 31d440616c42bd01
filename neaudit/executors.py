"""Executors run a list of tasks, all behind one signature, ``run(tasks, recipe, progress)``,
and all through the same atomic results store, so a run can be resumed by either:

* :class:`LocalExecutor`: in this process, in order (clean tasks first, then by shard), with
  the worker it is given or one built from the recipe.
* :class:`RayExecutor` (``pip install neaudit[ray]``): each actor builds its worker from the
  recipe (reading the data from shared storage and loading every model once), then runs tasks
  until the plan is done. A lost actor is restarted and its task retried; task records are
  keyed by task, so a retry overwrites rather than duplicates.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from neaudit.attacks import CLEAN
from neaudit.device import retained_heap
from neaudit.errors import NeauditError, Refused, unless_refused
from neaudit.plan import Task
from neaudit.worker import Worker, WorkerRecipe, build_worker

Progress = Callable[[], None] | None


class Executor(Protocol):
    def run(self, tasks: Sequence[Task], recipe: WorkerRecipe, progress: Progress = None
            ) -> None: ...


class LocalExecutor:
    """Runs tasks in order in this process."""

    def __init__(self, worker: Worker | None = None) -> None:
        self.worker = worker

    def run(self, tasks: Sequence[Task], recipe: WorkerRecipe, progress: Progress = None
            ) -> None:
        worker = self.worker or build_worker(recipe)
        for task in tasks:
            worker(task)
            if progress:
                progress()


class _AuditActor:
    def __init__(self, recipe: WorkerRecipe) -> None:
        # an actor's process is neaudit's: its tasks keep their freed memory for its life
        self._heap = contextlib.ExitStack()
        self._heap.enter_context(retained_heap())
        self.worker = build_worker(recipe)

    def pid(self) -> int:
        return os.getpid()

    def run(self, task: Task) -> str | Refused:
        """The task's id; an input error comes back as a value, raised by the driver as the
        same one line a local run prints (and not retried: a retry would meet it again)."""
        try:
            self.worker(task)
        except NeauditError as exc:
            return Refused(exc)
        return task.task_id


class RayExecutor:
    """Ray executor: ``workers`` actors, each asking ``cpus``/``gpus`` as resources. Without a
    Ray instance already initialized in this process, it starts one (``address``: connects to
    a cluster) and shuts it down when the run ends; initialize Ray yourself to keep one
    across runs."""

    def __init__(self, address: str | None = None, workers: int = 2, cpus: float = 1,
                 gpus: float = 0, max_retries: int = 3, num_cpus: int | None = None) -> None:
        for option, value, least in (("--ray-workers", workers, 1), ("--ray-cpus", cpus, 0),
                                     ("--ray-gpus", gpus, 0)):
            if not value >= least:  # NaN too
                raise NeauditError(f"{option} {value}: must be at least {least}. Fix: give "
                                   f"{'a count of actors' if least else 'a share per actor'}"
                                   ", e.g. 1.")
        self.address, self.workers, self.cpus, self.gpus = address, workers, cpus, gpus
        self.max_retries, self.num_cpus = max_retries, num_cpus
        self.pids: list[int] = []

    def run(self, tasks: Sequence[Task], recipe: WorkerRecipe, progress: Progress = None
            ) -> None:
        try:
            import ray
            from ray.util import ActorPool
        except ImportError as exc:
            raise NeauditError("the Ray executor needs Ray. Fix: pip install 'neaudit[ray]'."
                               ) from exc
        if not isinstance(recipe.data, str):
            raise NeauditError("the Ray executor needs the dataset as a path that every worker "
                               "can read (shared storage), not an in-memory dataset. Fix: save "
                               "it to shared storage and pass its path.")
        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, num_cpus=None if self.address else self.num_cpus,
                     include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        actor = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus,
                           max_restarts=self.max_retries,
                           max_task_retries=self.max_retries)(_AuditActor)
        actors = [actor.remote(recipe) for _ in range(self.workers)]
        self.pids = ray.get([a.pid.remote() for a in actors])
        try:
            # clean tasks first: label-free agreement reads their predictions
            for phase in ([t for t in tasks if t.attack == CLEAN],
                          [t for t in tasks if t.attack != CLEAN]):
                pool = ActorPool(actors)
                for done in pool.map_unordered(lambda a, t: a.run.remote(t), phase):
                    unless_refused(done)
                    if progress:
                        progress()
        finally:
            if started:  # the instance this run started, actors and all: nothing outlives it
                ray.shutdown()
            else:
                for handle in actors:
                    ray.kill(handle)
