"""Everything propagate asks of the OpenTelemetry API, in one place.

Every span propagate makes lives through the functions here: `start` begins it, `running`
makes it current for a block, records how the block failed and ends it, `current` makes it
current for one step (a generator's), and `fail` is the one rule for marking a span with
an exception, wherever it ends. A span identity, wherever it travels (a task's context,
a carrier, the relay's rebuilt spans), is `SpanIdentity`: ``(trace_id, span_id,
trace_flags, tracestate)`` with ``tracestate`` a tuple of pairs, because it pickles in
microseconds and holds no OpenTelemetry object. The SDK side (the relay) is in `_relay`,
the SDK's private attributes in `_private`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import opentelemetry.util.types
from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    Link,
    NonRecordingSpan,
    SpanContext,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

# Re-exported for the annotations of propagate's public signatures, so that these resolve
# at run time (typing.get_type_hints) without another module importing OpenTelemetry.
from opentelemetry.trace import Span as Span
from opentelemetry.trace import SpanKind as SpanKind
from opentelemetry.trace import Tracer as Tracer
from opentelemetry.util.types import Attributes as Attributes
from opentelemetry.util.types import AttributeValue as AttributeValue

# Newer APIs spell Attributes with forward references to "AnyValue", which
# typing.get_type_hints resolves in the namespace of the annotated function: modules that
# annotate with Attributes import this too (an older API has none, and needs none).
AnyValue: Any = getattr(opentelemetry.util.types, "AnyValue", Any)

SpanIdentity = tuple[int, int, int, tuple[tuple[str, str], ...]]
Token = object

TRACER = trace.get_tracer("propagate")
_EMPTY: otel_context.Context = otel_context.Context()


def identity(sc: SpanContext) -> SpanIdentity:
    """``sc`` as a `SpanIdentity`: the one encoding of a span's identity."""
    return (sc.trace_id, sc.span_id, int(sc.trace_flags), tuple(sc.trace_state.items()))


def span_context(identity: SpanIdentity, remote: bool = True) -> SpanContext:
    """The `SpanContext` a `SpanIdentity` encodes; ``remote`` unless said otherwise."""
    trace_id, span_id, flags, state = identity
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags),
                       trace_state=TraceState(list(state)))


def current_identity(ctx: otel_context.Context | None = None) -> SpanIdentity | None:
    """The current span's identity (in ``ctx``, else now), or None when it is not valid."""
    sc = trace.get_current_span(ctx).get_span_context()
    return identity(sc) if sc.is_valid else None


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
    return parent_context(None if identity is None else span_context(identity), baggage)


def parent_context(parent: SpanContext | None,
                   baggage: Mapping[str, object]) -> otel_context.Context:
    """A Context holding ``parent`` (as a non-recording span) and ``baggage``, and nothing else."""
    ctx = _EMPTY
    if parent is not None:
        ctx = trace.set_span_in_context(NonRecordingSpan(parent), ctx)
    for key, value in baggage.items():
        ctx = otel_baggage.set_baggage(key, value, ctx)
    return ctx


# The API's own functions, not wrappers: a worker runs them once per task, on a cold cache.
attach: Callable[[otel_context.Context], Token] = otel_context.attach
detach: Callable[[Token], None] = otel_context.detach  # type: ignore[assignment]
get_current: Callable[[], otel_context.Context] = otel_context.get_current


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
    return (identity(sc) if sc.is_valid else None), found


# -- span lifecycles ---------------------------------------------------------------------


def get_tracer(scope: str) -> trace.Tracer:
    """The tracer of instrumentation scope ``scope`` (``"propagate"``'s is `TRACER`)."""
    return trace.get_tracer(scope)


def start(name: str, tracer: trace.Tracer | None = None, **kwargs: Any) -> Span:
    """Start a span, not yet current: the keyword arguments are ``Tracer.start_span``'s."""
    return (tracer or TRACER).start_span(name, **kwargs)


def provider() -> trace.TracerProvider:
    """The global tracer provider (a proxy until one is set)."""
    return trace.get_tracer_provider()


def service_name() -> str:
    """The global tracer provider's ``service.name``, or ``""`` (the API's proxy has none)."""
    resource = getattr(provider(), "resource", None)
    name = getattr(resource, "attributes", {}).get("service.name")
    return name if isinstance(name, str) else ""


def set_provider(provider: trace.TracerProvider) -> None:
    """Set the global tracer provider: OpenTelemetry allows it once, then warns."""
    trace.set_tracer_provider(provider)


def baggage(ctx: otel_context.Context | None = None) -> Mapping[str, object]:
    """The baggage in ``ctx`` (else the current Context)."""
    return otel_baggage.get_all(ctx)


def in_context(span: Span) -> otel_context.Context:
    """The current Context with ``span`` as its current span."""
    return trace.set_span_in_context(span)


@contextmanager
def current(span: Span) -> Iterator[Span]:
    """``span`` current for the block, attached and detached right here; nothing else."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        otel_context.detach(token)


@contextmanager
def running(span: Span, outcome: Callable[[], BaseException | None] | None = None,
            ) -> Iterator[Span]:
    """``span`` current for the block, marked by how it failed (`fail`), ended right here.

    ``outcome``, when given, is asked as the block ends for the error its caller saw
    instead (a lookup that answered after its caller gave up): that error is the span's
    status, and the block's own, if any, stays recorded as an event.
    """
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        fail(span, exc)
        raise
    finally:
        seen = None if outcome is None else outcome()
        if seen is not None:
            fail(span, seen, record=False)
        otel_context.detach(token)
        span.end()


def task_span(name: str, link: bool, attributes: Mapping[str, Any]) -> AbstractContextManager[Span]:
    """A span for one task, current for the block and ended right here (`running`).

    With ``link`` the span is the root of a new trace, linked to the current span.
    """
    links: list[Link] = []
    parent: otel_context.Context | None = None
    if link:
        parent = _EMPTY
        sc = trace.get_current_span().get_span_context()
        if sc.is_valid:
            links.append(Link(sc, {"propagate.link": "follows_from"}))
    return running(start(name, context=parent, links=links, attributes=dict(attributes)))


def fail(span: Span, exc: BaseException, record: bool = True, set_status: bool = True) -> None:
    """Mark ``span`` with ``exc`` as OpenTelemetry's own ``use_span`` would: the one rule.

    ``record`` adds the exception as an event, ``set_status`` makes the span's status
    ERROR with ``"Type: message"`` as its description.

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
