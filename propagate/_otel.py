"""Everything propagate asks of the OpenTelemetry API, in one place.

Trace identity travels as a plain tuple, ``(trace_id, span_id, trace_flags, tracestate)``
with ``tracestate`` a tuple of pairs, because it pickles in microseconds and holds no
OpenTelemetry object.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

SpanIdentity = tuple[int, int, int, tuple[tuple[str, str], ...]]
Token = object

TRACER = trace.get_tracer("propagate")
_EMPTY: otel_context.Context = otel_context.Context()


def current_identity(ctx: otel_context.Context | None = None) -> SpanIdentity | None:
    """The current span's identity (in ``ctx``, else now), or None when it is not valid."""
    sc = trace.get_current_span(ctx).get_span_context()
    if not sc.is_valid:
        return None
    return (sc.trace_id, sc.span_id, int(sc.trace_flags), tuple(sc.trace_state.items()))


def current_fields() -> tuple[SpanIdentity | None, dict[str, object]]:
    """The current span's identity and the baggage, read from one current context.

    Tasks of one request read the same (immutable) Context: the fields read from the
    last one are kept, with a weak reference to it, and given again, as the same
    objects. Callers must not change them.
    """
    global _fields_of
    ctx = otel_context.get_current()
    ref, identity, baggage = _fields_of
    if ref is not None and ref() is ctx:
        return identity, baggage
    identity, baggage = current_identity(ctx), dict(otel_baggage.get_all(ctx))
    with contextlib.suppress(TypeError):  # a runtime whose Contexts take no weak references
        _fields_of = (weakref.ref(ctx), identity, baggage)
    return identity, baggage


_fields_of: tuple[Any, SpanIdentity | None, dict[str, object]] = (None, None, {})


def span_context(identity: SpanIdentity) -> SpanContext:
    trace_id, span_id, flags, state = identity
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags),
                       trace_state=TraceState(list(state)))


_last: tuple[object, otel_context.Context] = ((), _EMPTY)  # tasks of one request share one


def build(identity: SpanIdentity | None, baggage: Mapping[str, object]) -> otel_context.Context:
    """An OpenTelemetry Context holding a remote parent and baggage, and nothing else."""
    global _last
    key = (identity, tuple(baggage.items()))
    last_key, last = _last
    try:
        if key == last_key:
            return last
    except Exception:  # a value whose == raises (numpy-like): build afresh
        pass
    ctx = _build(identity, baggage)
    _last = (key, ctx)
    return ctx


def _build(identity: SpanIdentity | None, baggage: Mapping[str, object]) -> otel_context.Context:
    ctx = _EMPTY
    if identity is not None:
        ctx = trace.set_span_in_context(NonRecordingSpan(span_context(identity)), ctx)
    for key, value in baggage.items():
        ctx = otel_baggage.set_baggage(key, value, ctx)
    return ctx


# The API's own functions, not wrappers: a worker runs them once per task, on a cold cache.
attach: Callable[[otel_context.Context], Token] = otel_context.attach
detach: Callable[[Token], None] = otel_context.detach  # type: ignore[assignment]


@functools.cache
def context_scoped() -> bool:
    """Whether the current OpenTelemetry context belongs to the ``contextvars.Context``.

    So with OpenTelemetry's default runtime context, which keeps it in a ContextVar. A
    runtime configured otherwise (``OTEL_PYTHON_CONTEXT``) might keep it per thread.
    """
    probe = otel_context.Context()
    inside = contextvars.Context()
    token = inside.run(otel_context.attach, probe)
    try:
        return (otel_context.get_current() is not probe
                and inside.run(otel_context.get_current) is probe)
    finally:
        inside.run(otel_context.detach, token)


def inject(identity: SpanIdentity | None, baggage: Mapping[str, object]) -> dict[str, str]:
    from opentelemetry import propagate as otel_propagate  # loads the propagators: on use

    carrier: dict[str, str] = {}
    otel_propagate.inject(carrier, context=build(identity, baggage))
    return carrier


def extract(carrier: Mapping[str, str]) -> tuple[SpanIdentity | None, dict[str, object]]:
    """Read a carrier; anything malformed gives no parent rather than an exception."""
    from opentelemetry import propagate as otel_propagate

    try:
        ctx = otel_propagate.extract(dict(carrier))
        sc = trace.get_current_span(ctx).get_span_context()
        found = dict(otel_baggage.get_all(ctx))
    except Exception:  # a carrier is untrusted input: never crash on it
        logging.getLogger("propagate").debug("ignoring malformed carrier", exc_info=True)
        return None, {}
    if not sc.is_valid:
        return None, found
    return (sc.trace_id, sc.span_id, int(sc.trace_flags), tuple(sc.trace_state.items())), found


@contextmanager
def task_span(name: str, link: bool, attributes: Mapping[str, Any]) -> Iterator[Span]:
    """Start a span for one task and make it current, entered and exited right here.

    With ``link`` the span is the root of a new trace, linked to the current span.
    """
    links: list[Link] = []
    parent: otel_context.Context | None = None
    if link:
        parent = _EMPTY
        sc = trace.get_current_span().get_span_context()
        if sc.is_valid:
            links.append(Link(sc, {"propagate.link": "follows_from"}))
    with TRACER.start_as_current_span(name, context=parent, links=links,
                                      attributes=dict(attributes)) as span:
        yield span


def fail(span: Span, exc: BaseException, record: bool = True, set_status: bool = True) -> None:
    """Mark ``span`` with ``exc`` as OpenTelemetry's own ``use_span`` would.

    Which exceptions count is the installed OpenTelemetry's rule: releases differ on
    ``BaseException`` (cancellation, ``GeneratorExit``, ``KeyboardInterrupt``), so the
    rule is read once from ``use_span`` itself rather than written down here.
    """
    if not span.is_recording() or not (isinstance(exc, Exception) or _marks_base_exceptions()):
        return
    if record:
        span.record_exception(exc)
    if set_status:
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class _Probe(NonRecordingSpan):
    """A span that only says whether ``use_span`` marked it."""

    marked = False

    def is_recording(self) -> bool:
        return True

    def set_status(self, *args: Any, **kwargs: Any) -> None:
        self.marked = True


class _ProbeExit(BaseException):
    pass


@functools.cache
def _marks_base_exceptions() -> bool:
    probe = _Probe(INVALID_SPAN_CONTEXT)
    try:
        with trace.use_span(probe, record_exception=False):
            raise _ProbeExit
    except _ProbeExit:
        pass
    return probe.marked
