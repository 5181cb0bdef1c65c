"""Shared fixtures: one real SDK tracer provider for the session, cleared per test."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]


class ThreadRecorder(SpanProcessor):
    """Records the thread each span started and ended on (I4)."""

    def __init__(self) -> None:
        self.started: dict[int, int] = {}
        self.ended: dict[int, int] = {}

    def on_start(self, span: Span, parent_context: object = None) -> None:
        self.started[span.context.span_id] = threading.get_ident()

    def on_end(self, span: ReadableSpan) -> None:
        self.ended[span.context.span_id] = threading.get_ident()

    def clear(self) -> None:
        self.started.clear()
        self.ended.clear()


EXPORTER = InMemorySpanExporter()
THREADS = ThreadRecorder()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(THREADS)
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(PROVIDER)


@contextlib.contextmanager
def with_processor(processor: SpanProcessor) -> Iterator[SpanProcessor]:
    """``processor`` added to the session's provider for the block, then taken off again.

    The SDK has no public way to remove a span processor: this reaches into its
    multi-processor, as only a test should.
    """
    PROVIDER.add_span_processor(processor)
    try:
        yield processor
    finally:
        multi: Any = PROVIDER._active_span_processor
        with multi._lock:
            multi._span_processors = tuple(p for p in multi._span_processors
                                           if p is not processor)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """The session's in-memory exporter, empty at the start of the test."""
    EXPORTER.clear()
    THREADS.clear()
    yield EXPORTER


@pytest.fixture
def tracer() -> trace.Tracer:
    return trace.get_tracer("tests")


@pytest.fixture(autouse=True)
def no_detach_failures(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """I4: nothing in any test logs "Failed to detach context"."""
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    yield
    failures = [r for r in caplog.records if "Failed to detach context" in r.getMessage()]
    assert not failures, failures


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    """Every test starts and ends with no current span."""
    assert not trace.get_current_span().get_span_context().is_valid
    yield
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """Each available multiprocessing start method in turn."""
    return multiprocessing.get_context(request.param)


def extra_state(exc: BaseException) -> dict[str, object]:
    """An exception's ``vars()``, less the one entry the relay may leave under tblib.

    The relay's spans ride in ``__dict__["__suppress_context__"]`` and unpickle into the
    exception's own flag. Plain pickle restores that key through the attribute's
    descriptor (nothing shows); tblib's reducer (installed by ``import distributed``)
    assigns ``__dict__`` wholesale, so the entry stays visible, holding the flag as it
    was in the worker (a bool; the caller's may differ: the stdlib sets ``__cause__``).
    """
    state = dict(vars(exc))
    if isinstance(state.get("__suppress_context__"), bool):
        del state["__suppress_context__"]
    return state


@contextlib.contextmanager
def with_baggage(**items: object) -> Iterator[None]:
    """Baggage entries current for the block, on top of what is current."""
    ctx = otel_context.get_current()
    for key, value in items.items():
        ctx = baggage.set_baggage(key, value, ctx)
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)
