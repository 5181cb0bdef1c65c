"""Task functions for the joblib tests, importable by name in loky's worker processes.

loky's workers start afresh (not forked) and import this module to unpickle a task, so
`REQUEST_ID` is registered there as here. Kept light: no pytest, and not `tests.helpers`.
"""

from __future__ import annotations

import os
import threading
import time
from contextvars import ContextVar
from typing import Any

import joblib
from opentelemetry import baggage, context, trace

import propagate

REQUEST_ID: ContextVar[str] = propagate.register(ContextVar("tests.joblib.request_id"))
PAYLOAD: ContextVar[object] = propagate.register(ContextVar("tests.joblib.payload"))
UNREGISTERED: ContextVar[str] = ContextVar("tests.joblib.unregistered", default="worker")
WAIT = 60.0


class TaskFailed(Exception):
    """Raised in a worker, to check that the caller gets this very type back."""


def identity(x: object) -> object:
    """The smallest task: the benchmark's unit of work."""
    return x


def seen() -> dict[str, Any]:
    """What of the caller's context a task sees, without recording a span."""
    sc = trace.get_current_span().get_span_context()
    return {
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "trace_id": sc.trace_id,
        "span_id": sc.span_id,
        "baggage": dict(baggage.get_all()),
        "request_id": REQUEST_ID.get(None),
        "unregistered": UNREGISTERED.get(),
    }


def record(name: str) -> dict[str, Any]:
    """Record one span; report where it ran, its ids and what of the context it saw."""
    with trace.get_tracer("tests.joblib").start_as_current_span(name) as span:
        return {**seen(), "own_span_id": span.get_span_context().span_id}


def change_context(value: str) -> dict[str, Any]:
    """What the task saw, then set every kind of context it can: none of it may leak."""
    before = seen()
    REQUEST_ID.set(value)
    UNREGISTERED.set(value)
    context.attach(baggage.set_baggage("changed", value))  # never detached: must not leak
    return before


def fail(name: str, message: str) -> None:
    """Record a span, then raise `TaskFailed` from inside it."""
    with trace.get_tracer("tests.joblib").start_as_current_span(name):
        raise TaskFailed(message)


def wait_for(path: str) -> bool:
    """Whether the file ``path`` appears within `WAIT` seconds."""
    deadline = time.monotonic() + WAIT
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def record_when(name: str, release: str) -> dict[str, Any]:
    """`record`, once the file ``release`` exists."""
    wait_for(release)
    return record(name)


def die_when(name: str, release: str) -> None:
    """Record a span, wait for the file ``release``, then kill this worker mid-task."""
    with trace.get_tracer("tests.joblib").start_as_current_span(name):
        wait_for(release)
        os._exit(17)


def nested(name: str, inner: list[str]) -> dict[str, Any]:
    """Inside a span, a nested ``Parallel`` call (joblib's default for it) recording ``inner``."""
    with trace.get_tracer("tests.joblib").start_as_current_span(name) as span:
        found = joblib.Parallel(n_jobs=2)(joblib.delayed(record)(n) for n in inner)
        return {**seen(), "own_span_id": span.get_span_context().span_id, "inner": found}


def the_variable() -> ContextVar[str]:
    """The registered ContextVar itself, as a result: crosses back by name."""
    return REQUEST_ID


def record_then_processors(name: str) -> list[str]:
    """Record a span, then name the span processors of this process's tracer provider."""
    record(name)
    active = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    return [type(p).__name__ for p in getattr(active, "_span_processors", ())]


class Reduced:
    """A type a test gives a loky reducer of its own: does the batch still go through loky's?"""
