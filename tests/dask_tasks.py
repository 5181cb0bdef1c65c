"""Task functions for the Dask tests, importable by name in Dask's worker processes.

Dask pickles a module-level function by reference, so the workers import this module;
a function defined in a test would cross by value and hide import-time behaviour (the
registration of `REQUEST_ID` here) from the test.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from opentelemetry import baggage, trace

import propagate

REQUEST_ID: ContextVar[str] = propagate.register(ContextVar("tests.dask.request_id"))
UNREGISTERED: ContextVar[str] = ContextVar("tests.dask.unregistered", default="worker")


class TaskFailed(Exception):
    """Raised on a worker, to check that the caller gets this very type back."""


def identity(x: int) -> int:
    """The smallest task: the benchmark's unit of work."""
    return x


def parent_ids() -> tuple[int, int]:
    """The trace and span id of the current span, as the worker sees it."""
    sc = trace.get_current_span().get_span_context()
    return sc.trace_id, sc.span_id


def record(name: str) -> dict[str, Any]:
    """Record one span on the worker; report where it ran and what it saw."""
    with trace.get_tracer("tests.dask").start_as_current_span(name) as span:
        sc = span.get_span_context()
        return {
            "pid": os.getpid(),
            "thread": threading.get_ident(),
            "trace_id": sc.trace_id,
            "span_id": sc.span_id,
            "baggage": dict(baggage.get_all()),
            "request_id": REQUEST_ID.get(None),
            "unregistered": UNREGISTERED.get(),
        }


def seen() -> dict[str, Any]:
    """What of the context a task sees, without recording a span."""
    return {
        "baggage": dict(baggage.get_all()),
        "request_id": REQUEST_ID.get(None),
        "unregistered": UNREGISTERED.get(),
        "span_valid": trace.get_current_span().get_span_context().is_valid,
    }


def change_context(value: str) -> str | None:
    """Set the registered variable and baggage on the worker; return what was there first."""
    before = REQUEST_ID.get(None)
    REQUEST_ID.set(value)
    UNREGISTERED.set(value)
    from opentelemetry import context

    context.attach(baggage.set_baggage("changed", value))  # never detached: must not leak
    return before


def fail(name: str, message: str) -> None:
    """Record a span, then raise `TaskFailed` from inside it."""
    with trace.get_tracer("tests.dask").start_as_current_span(name):
        raise TaskFailed(message)


class Unseen(Exception):
    """Raised by one test only: in each worker, the first of its type that Dask reports."""


def fail_unseen(name: str) -> None:
    """Record a span, then raise `Unseen` from inside it."""
    with trace.get_tracer("tests.dask").start_as_current_span(name):
        raise Unseen(name)


def die(name: str) -> None:
    """Record a span, then kill the worker process mid-task."""
    with trace.get_tracer("tests.dask").start_as_current_span(name):
        os._exit(17)


def span_processors() -> list[str]:
    """The class names of the span processors of this process's tracer provider."""
    active = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    return [type(p).__name__ for p in getattr(active, "_span_processors", ())]


def _wait_for(ready: Callable[[], bool], timeout: float) -> bool:
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

    with trace.get_tracer("tests.dask").start_as_current_span(name):
        open(os.path.join(path, f"{name}.ready"), "w").close()
        together = _wait_for(lambda: arrived() >= parties, timeout)
    if release is not None:
        _wait_for(lambda: os.path.exists(release), timeout)
    return {"pid": os.getpid(), "thread": threading.get_ident(), "together": together}
