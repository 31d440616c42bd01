"""Progress bars on stderr for the jobs (tqdm, imported only when a bar is shown)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, what: str, unit: str, quiet: bool, done: int = 0
                 ) -> Iterator[Callable[..., object] | None]:
    """A bar on stderr for ``total`` units of ``what``, ``done`` of them before it starts (a
    resumed run's), advanced by the callable it yields (one unit, unless given a count);
    nothing when ``quiet``."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, initial=done, desc=what, unit=unit, file=sys.stderr) as bar:
        yield bar.update
