"""Task functions the engine tests share (Dask, Ray, joblib), importable by name in workers.

Each engine's workers import a task function's module by name to run it, so `REQUEST_ID`
is registered there as here; a function defined in a test would cross by value and hide
that import-time behaviour from the test. Kept light: no pytest, and not `tests.helpers`.
What only one engine's tests use is in its own module (`tests.dask_tasks`,
`tests.ray_tasks`, `tests.joblib_tasks`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import baggage, context, trace

import propagate

REQUEST_ID: ContextVar[str] = propagate.register(ContextVar("tests.engines.request_id"))
UNREGISTERED: ContextVar[str] = ContextVar("tests.engines.unregistered", default="worker")
WAIT = 60.0

tracer = trace.get_tracer("tests.engines")


class TaskFailed(Exception):
    """Raised in a worker, to check that the caller gets this very type back."""


def identity(x: Any) -> Any:
    """The smallest task: the benchmarks' unit of work."""
    return x


def seen() -> dict[str, Any]:
    """Where the task runs and what of the caller's context it sees, recording nothing."""
    sc = trace.get_current_span().get_span_context()
    return {
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "host": socket.gethostname(),
        "trace_id": sc.trace_id,
        "span_id": sc.span_id,
        "span_valid": sc.is_valid,
        "baggage": dict(baggage.get_all()),
        "request_id": REQUEST_ID.get(None),
        "unregistered": UNREGISTERED.get(),
    }


def record(name: str, gate: str | None = None) -> dict[str, Any]:
    """Record one span (once the file ``gate`` exists, if given); `seen` from inside it."""
    if gate is not None:
        wait_for(gate)
    with tracer.start_as_current_span(name) as span:
        return {**seen(), "own_span_id": span.get_span_context().span_id}


def change_context(value: str) -> dict[str, Any]:
    """`seen`, then set every kind of context a task can set: none of it may leak."""
    before = seen()
    REQUEST_ID.set(value)
    UNREGISTERED.set(value)
    context.attach(baggage.set_baggage("changed", value))  # never detached: must not leak
    return before


def fail(name: str, message: str, gate: str | None = None) -> None:
    """Record a span (once the file ``gate`` exists, if given), then raise `TaskFailed`
    from inside it, with more than a message in its arguments."""
    if gate is not None:
        wait_for(gate)
    with tracer.start_as_current_span(name):
        raise TaskFailed(message, 42)


def wait_for(path: str, timeout: float = WAIT) -> bool:
    """Whether the file ``path`` appears within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def span_processors() -> list[str]:
    """The class names of the span processors of this process's tracer provider."""
    active = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    return [type(p).__name__ for p in getattr(active, "_span_processors", ())]
