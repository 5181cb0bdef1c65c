"""Task functions only the Dask tests use, importable by name in Dask's worker processes
(the shared ones are in `tests.engine_tasks`)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.engine_tasks import tracer


class Unseen(Exception):
    """Raised by one test only: in each worker, the first of its type that Dask reports."""


def fail_unseen(name: str) -> None:
    """Record a span, then raise `Unseen` from inside it."""
    with tracer.start_as_current_span(name):
        raise Unseen(name)


def die(name: str) -> None:
    """Record a span, then kill the worker process mid-task."""
    with tracer.start_as_current_span(name):
        os._exit(17)


def _wait_until(ready: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.01)
    return ready()


def concurrent_record(name: str, path: str, parties: int, release: str | None,
                      timeout: float) -> dict[str, Any]:
    """Record a span that ends only once ``parties`` tasks are inside theirs, in one worker.

    Each task marks its arrival with a file in ``path``. With ``release``, the task
    returns only once that file exists, after its span has ended.
    """
    def arrived() -> int:
        return sum(entry.endswith(".ready") for entry in os.listdir(path))

    with tracer.start_as_current_span(name):
        open(os.path.join(path, f"{name}.ready"), "w").close()
        together = _wait_until(lambda: arrived() >= parties, timeout)
    if release is not None:
        _wait_until(lambda: os.path.exists(release), timeout)
    return {"pid": os.getpid(), "thread": threading.get_ident(), "together": together}
