"""Module-level tasks for test_asyncio: process pools must import what they run."""

from __future__ import annotations

import os
from contextvars import ContextVar

from opentelemetry import trace

import propagate

REQUEST_ID: ContextVar[str] = propagate.register(ContextVar("tests.asyncio_tasks.request_id"))


def observe(tag: str, *, suffix: str = "") -> tuple[str | None, int, int, str, int]:
    """What a task sees of its context, after starting and ending one span of its own."""
    sc = trace.get_current_span().get_span_context()
    with trace.get_tracer(__name__).start_as_current_span("in-worker"):
        pass
    return REQUEST_ID.get(None), sc.trace_id, sc.span_id, tag + suffix, os.getpid()


def fail(message: str) -> None:
    """Raise an exception the caller must get back unchanged."""
    raise LookupError(message, 42)


UNREGISTERED: ContextVar[str] = ContextVar("tests.asyncio_tasks.unregistered", default="default")


def unregistered() -> str:
    """The worker's view of a ContextVar that is not registered: its own value."""
    return UNREGISTERED.get()
