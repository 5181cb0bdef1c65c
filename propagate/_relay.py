"""The relay: spans a worker process records come home to the parent's span processors.

In the worker, a span processor collects the spans each task ends. It routes them by a
ContextVar, so tasks running side by side in one worker (Dask's threads) keep theirs
apart. The batch rides home on the task's own result: unpickling it in the parent, in
the thread that is about to resolve the future, hands the spans to the parent's
processors first. So they arrive exactly once, before the future resolves, and nothing
is left buffered in a worker when the pool shuts it down.

Needs opentelemetry-sdk; imported only when the relay is in use.
"""

from __future__ import annotations

import copyreg
import logging
import os
import secrets
import socket
import threading
from collections import deque
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    ProxyTracerProvider,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.status import Status, StatusCode

from . import _private

log = logging.getLogger("propagate")

Origin = tuple[int, str]
Source = tuple[str, int]
_TOKEN = secrets.token_hex(8)  # inherited by a forked child, whose pid then differs
_batch: ContextVar[list[tuple[Any, ...]] | None] = ContextVar("propagate.relay.batch", default=None)
_stray: deque[tuple[Any, ...]] = deque(maxlen=4096)  # ended outside any task: sent with the next
_installed_in: int | None = None
_install_lock = threading.Lock()


def here() -> Origin:
    """This process's identity, as a task's origin."""
    return (os.getpid(), _TOKEN)


def enabled() -> bool:
    """Whether the global tracer provider is the SDK's, so relayed spans have somewhere to go."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


class _Collector(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        batch = _batch.get()
        (_stray if batch is None else batch).append(_encode(span))

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_COLLECTOR = _Collector()


def install() -> None:
    """Make this worker process record spans into the relay instead of exporting them."""
    global _installed_in
    if _installed_in == os.getpid():
        return
    with _install_lock:
        if _installed_in == os.getpid():
            return
        provider = trace.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            # Inherited through fork, or configured at import: the parent exports, so
            # exporting here as well would duplicate spans and lose them at shutdown.
            _private.replace_span_processors(provider, _COLLECTOR)
        elif isinstance(provider, ProxyTracerProvider):
            provider = TracerProvider(shutdown_on_exit=False)
            provider.add_span_processor(_COLLECTOR)
            trace.set_tracer_provider(provider)
        _installed_in = os.getpid()


class Batch:
    """Collects the spans one task ends, in the Context the task runs in."""

    def __init__(self) -> None:
        self.spans: list[tuple[Any, ...]] = []
        _batch.set(self.spans)

    def close(self) -> list[tuple[Any, ...]]:
        _batch.set(None)
        while _stray:
            try:
                self.spans.append(_stray.popleft())
            except IndexError:  # another task's batch took the last one
                break
        return self.spans


def reply(origin: Origin, spans: list[tuple[Any, ...]], result: Any) -> Any:
    """What the task returns: its result, carrying its spans home if it has any."""
    return Reply(origin, _source(), spans, result) if spans else result


def _source() -> Source:
    """Where spans were recorded: becomes ``host.name`` and ``process.pid`` of their resource."""
    return (socket.gethostname(), os.getpid())


class Reply:
    """A task's result with its spans; unpickles in the origin process as the bare result."""

    __slots__ = ("origin", "result", "source", "spans")

    def __init__(self, origin: Origin, source: Source, spans: list[tuple[Any, ...]],
                 result: Any) -> None:
        self.origin, self.source, self.spans, self.result = origin, source, spans, result

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrive, (self.origin, self.source, self.spans, self.result))


def _arrive(origin: Origin, source: Source, spans: list[tuple[Any, ...]], result: Any) -> Any:
    if origin != here():  # unpickled on the way (a Dask worker spilling it): keep carrying
        return Reply(origin, source, spans, result)
    deliver(source, spans)
    return result


class _Spans:
    """Spans riding on a task's exception; unpickles as the exception's own flag (see stash)."""

    def __init__(self, origin: Origin, spans: list[tuple[Any, ...]], suppress: bool) -> None:
        self.origin, self.source, self.spans, self.suppress = origin, _source(), spans, suppress

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrive_failed, (self.origin, self.source, self.spans, self.suppress))


def _arrive_failed(origin: Origin, source: Source, spans: list[tuple[Any, ...]],
                   suppress: bool) -> bool:
    if origin == here():
        deliver(source, spans)
    return suppress


_KEY = "__suppress_context__"


def stash(exc: BaseException, origin: Origin, spans: list[tuple[Any, ...]]) -> None:
    """Let ``exc`` carry ``spans`` home without changing its type, args or traceback.

    Exceptions pickle their ``__dict__`` as state, and ``BaseException.__setstate__``
    restores it with setattr (as tblib's reducers do). So an entry under the key
    ``__suppress_context__`` is unpickled, delivering the spans, into the exception's own
    ``__suppress_context__`` value, and then set through that attribute's descriptor: the
    exception arrives as it left, with no extra attribute. In the worker the descriptor
    hides the entry too.
    """
    if not spans:
        return
    exc.__dict__[_KEY] = _Spans(origin, spans, exc.__suppress_context__)
    reducer = copyreg.dispatch_table.get(type(exc))  # tblib registers exceptions here
    state = reducer(exc) if reducer is not None else exc.__reduce_ex__(2)
    if not (isinstance(state, tuple) and len(state) > 2 and isinstance(state[2], dict)
            and _KEY in state[2]):
        del exc.__dict__[_KEY]
        log.warning("spans of a failed task were not relayed: %s.__reduce__ drops "
                    "the exception's __dict__", type(exc).__qualname__)


_resources: dict[tuple[int, Source], Resource] = {}


def deliver(source: Source, spans: list[tuple[Any, ...]]) -> None:
    """Hand relayed spans to the global provider's processors; never fail the task over it."""
    provider = trace.get_tracer_provider()
    if not spans or not isinstance(provider, TracerProvider):
        return
    try:
        key = (id(provider.resource), source)
        resource = _resources.get(key)
        if resource is None:
            if len(_resources) > 256:
                _resources.clear()
            host, pid = source
            resource = _resources[key] = provider.resource.merge(
                Resource({"host.name": host, "process.pid": pid}))
        processor = _private.span_processor(provider)
        if processor is None:
            return
        for encoded in spans:
            processor.on_end(_decode(encoded, resource))
    except Exception:  # telemetry trouble never fails the user's job
        log.warning("could not deliver %d relayed spans", len(spans), exc_info=True)


def _identity(sc: SpanContext) -> tuple[Any, ...]:
    state = tuple(sc.trace_state.items())
    return (sc.trace_id, sc.span_id, int(sc.trace_flags), state, sc.is_remote)


def _context(identity: tuple[Any, ...]) -> SpanContext:
    trace_id, span_id, flags, state, remote = identity
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags),
                       trace_state=TraceState(list(state)))


def _encode(span: ReadableSpan) -> tuple[Any, ...]:
    scope = span.instrumentation_scope
    return (
        span.name,
        _identity(span.context),
        None if span.parent is None else _identity(span.parent),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        tuple((e.name, e.timestamp, dict(e.attributes or {})) for e in span.events),
        tuple((_identity(lk.context), dict(lk.attributes or {})) for lk in span.links),
        span.status.status_code.value,
        span.status.description,
        None if scope is None else (scope.name, scope.version, scope.schema_url),
    )


def _decode(encoded: tuple[Any, ...], resource: Resource) -> ReadableSpan:
    (name, context, parent, kind, start, end, attributes, events, links, code, description,
     scope) = encoded
    return ReadableSpan(
        name=name,
        context=_context(context),
        parent=None if parent is None else _context(parent),
        resource=resource,
        attributes=attributes,
        events=[Event(n, a, timestamp=t) for n, t, a in events],
        links=[Link(_context(c), a) for c, a in links],
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=None if scope is None else InstrumentationScope(*scope),
    )
