"""What the tests share: the session's one SDK tracer provider, and small helpers over it.

Test modules import from here, one way: ``from tests.helpers import ...``; conftest.py
imports the provider's parts for its fixtures. Importing this module sets the global
tracer provider (conftest.py does so first, before any test module is collected).

The task modules that workers import (`tests.process_tasks`, `tests.asyncio_tasks`,
`tests.engine_tasks` and the engines' own) never import this module: they stay light in
spawned processes and subinterpreters. A forked worker has it already, and may look at
``EXPORTER`` through ``sys.modules`` (see `tests.process_tasks.exported_here`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import threading
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

T = TypeVar("T")

START_METHODS = [m for m in ("fork", "forkserver", "spawn")
                 if m in multiprocessing.get_all_start_methods()]


# -- the session's tracer provider ---------------------------------------------------------


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


# -- finished spans ------------------------------------------------------------------------


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """Every finished span called ``name``, in the order they ended."""
    return [s for s in exporter.get_finished_spans() if s.name == name]


def one_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    """The one finished span called ``name`` (ended exactly once)."""
    spans = spans_named(exporter, name)
    assert len(spans) == 1, [s.name for s in exporter.get_finished_spans()]
    return spans[0]


def assert_ended_where_started() -> None:
    """I4: every span started since the test began was ended on the thread that started it.

    Reads the session's `THREADS`, which the ``exporter`` fixture clears.
    """
    assert THREADS.started
    for span_id, ident in THREADS.started.items():
        assert THREADS.ended.get(span_id) == ident, f"span {span_id:016x}"


def detach_failures(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The records that say OpenTelemetry failed to detach a context (I4: there are none)."""
    return [r for r in records if "Failed to detach context" in r.getMessage()]


# -- the current context -------------------------------------------------------------------


def current_ids() -> tuple[int, int]:
    """The current span's (trace_id, span_id), as seen from wherever this runs."""
    sc = trace.get_current_span().get_span_context()
    return sc.trace_id, sc.span_id


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


@contextlib.contextmanager
def setting(var: ContextVar[T], value: T) -> Iterator[None]:
    """``var`` set to ``value`` for the block, then reset."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


# -- what crossed, what was kept -----------------------------------------------------------


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


def assert_freed(ref: weakref.ref[Any], timeout: float = 60) -> None:
    """I5: what ``ref`` refers to is freed, within ``timeout`` seconds.

    The stdlib's workers delete a work item just after resolving its future: poll a little.
    """
    deadline = time.monotonic() + timeout
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]


# -- the demo ------------------------------------------------------------------------------


def assert_demo_tree(spans: list[dict[str, Any]]) -> None:
    """``python -m propagate demo --json``'s spans form one request's tree (I1, I4, I6):
    every span but the background job descends from the request, those of worker
    processes included, the span after a stream closed in another task is the request's
    child, and the job is a new trace linked to the request."""
    by_id = {s["span_id"]: s for s in spans}
    [request] = [s for s in spans if s["name"] == "GET /report"]
    [job] = [s for s in spans if s["name"] == "reindex"]
    assert job["links"] == [request["span_id"]] and job["trace_id"] != request["trace_id"]
    for span in spans:
        if span is request or span is job:
            continue
        while span["parent_id"] in by_id:
            span = by_id[span["parent_id"]]
        assert span is request
    [summarize] = [s for s in spans if s["name"] == "summarize"]
    assert summarize["parent_id"] == request["span_id"]  # not the stream's, ended elsewhere
    names = {s["name"] for s in spans}
    assert {"dns.lookup", "render page 0", "render page 1", "parse report",
            "audit log (fire-and-forget)", "decode shard 2", "upload part 1"} <= names
    workers = {s["pid"] for s in spans if str(s["name"]).startswith("render")}
    assert request["pid"] not in workers
