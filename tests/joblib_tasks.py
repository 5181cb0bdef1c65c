"""Task functions only the joblib tests use, importable by name in loky's worker processes
(the shared ones are in `tests.engine_tasks`). loky's workers start afresh (not forked)
and import these modules to unpickle a task, so `PAYLOAD` is registered there as here.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any

import joblib

import propagate
from tests.engine_tasks import REQUEST_ID, record, seen, span_processors, tracer, wait_for

PAYLOAD: ContextVar[object] = propagate.register(ContextVar("tests.joblib.payload"))


def die_when(name: str, release: str) -> None:
    """Record a span, wait for the file ``release``, then kill this worker mid-task."""
    with tracer.start_as_current_span(name):
        wait_for(release)
        os._exit(17)


def nested(name: str, inner: list[str]) -> dict[str, Any]:
    """Inside a span, a nested ``Parallel`` call (joblib's default for it) recording ``inner``."""
    with tracer.start_as_current_span(name) as span:
        found = joblib.Parallel(n_jobs=2)(joblib.delayed(record)(n) for n in inner)
        return {**seen(), "own_span_id": span.get_span_context().span_id, "inner": found}


def the_variable() -> ContextVar[str]:
    """The registered ContextVar itself, as a result: crosses back by name."""
    return REQUEST_ID


def record_then_processors(name: str) -> list[str]:
    """Record a span, then name the span processors of this process's tracer provider."""
    record(name)
    return span_processors()


class Reduced:
    """A type a test gives a loky reducer of its own: does the batch still go through loky's?"""
