"""The relay: spans a worker process records come home to the parent's span processors.

In the worker, a span processor collects the spans each task ends. It routes them by a
ContextVar, so tasks running side by side in one worker (Dask's threads) keep theirs
apart. The batch rides home on the task's own result or exception: unpickling it in the
parent, in the thread that is about to resolve the future, hands the spans to the
parent's processors first (before the result itself is unpickled, so a result that
cannot be unpickled loses none of them). So they arrive exactly once, before the future
resolves, and nothing is left buffered in a worker when the pool shuts it down.

A span ended outside any task (in a thread a task started) waits for the next task of
the origin it was started under, and goes home with it: never to another origin.

Needs opentelemetry-sdk; imported only when the relay is in use.
"""

from __future__ import annotations

import copyreg
import logging
import os
import secrets
import socket
import sys
import threading
from collections import deque
from contextvars import ContextVar
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, ProxyTracerProvider, SpanContext, SpanKind
from opentelemetry.trace.status import Status, StatusCode

from . import _otel, _private, _wire

log = logging.getLogger("propagate")

Origin = tuple[int, str]
Source = tuple[str, int]
_TOKEN = secrets.token_hex(8)  # inherited by a forked child, whose pid then differs
_pid = os.getpid()  # os.getpid() is a system call; tasks ask for it twice each
_here = (_pid, _TOKEN)  # one tuple, not one per task: a pending task holds it


def _forked() -> None:
    global _pid, _here
    _pid = os.getpid()
    _here = (_pid, _TOKEN)


if hasattr(os, "register_at_fork"):  # no fork, no other pid to catch up with
    os.register_at_fork(after_in_child=_forked)
_installed_in: int | None = None
_install_lock = threading.Lock()


def here() -> Origin:
    """This process's identity, as a task's origin."""
    return _here


def enabled() -> bool:
    """Whether the global tracer provider is the SDK's, so relayed spans have somewhere to go.

    OpenTelemetry sets its global provider once: once it is the SDK's, it stays.
    """
    global _sdk_provider
    if not _sdk_provider:
        _sdk_provider = isinstance(_otel.provider(), TracerProvider)
    return _sdk_provider


_sdk_provider = False


def origin() -> Origin | None:
    """Where tasks submitted here should send their spans: here, if the relay has a provider."""
    return here() if enabled() else None


class _Collector(SpanProcessor):
    """The worker's only span processor: each span into its task's batch."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        found = _otel.baggage(parent_context)
        if found:  # the parent's processors see it at on_start, as for a local span
            with _lock:
                if len(_baggage_at_start) > 65536:
                    _baggage_at_start.clear()
                _baggage_at_start[span.context.span_id] = dict(found)

    def on_end(self, span: ReadableSpan) -> None:
        started = None
        if _baggage_at_start:  # mostly empty: no baggage, no second lock
            with _lock:
                started = _baggage_at_start.pop(span.context.span_id, None)
        encoded = _encode(span, started)
        batch = _batch.get()
        with _lock:
            if batch is not None and batch.spans is not None:
                batch.spans.append(encoded)
                return
            origin = batch.origin if batch is not None else _only_origin()
            if origin is not None:
                _strays.setdefault(origin, deque(maxlen=4096)).append(encoded)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


_COLLECTOR = _Collector()
_lock = threading.Lock()
_baggage_at_start: dict[int, dict[str, object]] = {}
_strays: dict[Origin, deque[tuple[Any, ...]]] = {}  # ended outside any task, by origin
_origins: list[Origin] = []  # the origins this worker has served (two at most: then "many")


def _only_origin() -> Origin | None:
    """Where a span ended outside any task of a known origin goes: the only origin, if one."""
    return _origins[0] if len(_origins) == 1 else None


class Batch:
    """Collects the spans one task ends, in the Context the task runs in."""

    __slots__ = ("origin", "spans")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.spans: list[tuple[Any, ...]] | None = []
        if origin not in _origins and len(_origins) < 2:
            with _lock:
                if origin not in _origins and len(_origins) < 2:
                    _origins.append(origin)
        _batch.set(self)

    def close(self) -> list[tuple[Any, ...]]:
        """The spans, and this origin's strays; spans ended later wait for its next task."""
        with _lock:  # from now on the collector sends this task's spans to the strays
            spans, self.spans = self.spans or [], None
            strays = _strays.pop(self.origin, None) if _strays else None
        if strays:
            spans.extend(strays)
        return spans


_batch: ContextVar[Batch | None] = ContextVar("propagate.relay.batch", default=None)


def install() -> None:
    """Make this worker process record spans into the relay instead of exporting them.

    Never fails the task: whatever provider the worker has, the task runs, and the relay
    does what it can with one warning.
    """
    global _installed_in
    if _installed_in == os.getpid():
        return
    with _install_lock:
        if _installed_in == os.getpid():
            return
        _origins.clear()  # a forked child starts with its parent's
        _strays.clear()
        try:
            _install(_otel.provider())
        except Exception:  # telemetry trouble never fails the user's job
            log.warning("propagate could not install its span relay in worker process %d; "
                        "spans recorded here are not sent home", os.getpid(), exc_info=True)
        _installed_in = os.getpid()  # last: a task racing this one waits on the lock


def _install(provider: object) -> None:
    if isinstance(provider, TracerProvider):
        # Inherited through fork, or configured at import: the parent exports, so
        # exporting here as well would duplicate spans and lose them at shutdown.
        if _private.replace_span_processors(provider, _COLLECTOR):
            return
        try:  # another kind of active processor: add to it, its exporters keep theirs
            provider.add_span_processor(_COLLECTOR)
        except Exception as exc:
            log.warning("propagate: the tracer provider of worker process %d has an active "
                        "span processor the relay can neither replace nor add to (%s: %s); "
                        "spans recorded there are not sent home", os.getpid(),
                        type(exc).__name__, exc)
    elif isinstance(provider, ProxyTracerProvider):
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(_COLLECTOR)
        _otel.set_provider(provider)


def open_batch(origin: Origin) -> Batch | None:
    """The batch a task sent from ``origin`` records into; None if it was sent from here."""
    if origin == _here:  # not another process or interpreter
        return None
    if _installed_in != _pid:
        install()
    return Batch(origin)


def reply(origin: Origin, spans: list[tuple[Any, ...]], result: Any,
          logs: list[bytes] | None = None) -> Any:
    """What the task returns: its result, carrying its spans (and log records) home."""
    return Reply(origin, _source(), spans, result, logs) if spans or logs else result


def _source() -> Source:
    """Where spans were recorded: becomes ``host.name`` and ``process.pid`` of their resource."""
    return (socket.gethostname(), os.getpid())


class _Delivery:
    """Spans (and log records, `_logs`) on their way home: pickled before what they ride
    on, so unpickled first."""

    __slots__ = ("logs", "origin", "source", "spans")

    def __init__(self, origin: Origin, source: Source, spans: list[tuple[Any, ...]],
                 logs: list[bytes] | None = None) -> None:
        self.origin, self.source, self.spans, self.logs = origin, source, spans, logs

    def __reduce__(self) -> tuple[Any, ...]:
        if self.logs:
            return (_delivered, (self.origin, self.source, self.spans, self.logs))
        return (_delivered, (self.origin, self.source, self.spans))


def _delivered(origin: Origin, source: Source, spans: list[tuple[Any, ...]],
               logs: list[bytes] | None = None) -> _Delivery | None:
    """None once delivered here; the delivery itself, still to carry, anywhere else.

    Spans first, then the records: a record's handler may look its span up.
    """
    if origin != here():  # unpickled on the way (a Dask worker spilling it): keep carrying
        return _Delivery(origin, source, spans, logs)
    deliver(source, spans)
    if logs:
        from . import _logs

        _logs.deliver(logs)
    return None


class Reply:
    """A task's result with its spans; unpickles in the origin process as the bare result."""

    __slots__ = ("delivery", "result")

    def __init__(self, origin: Origin, source: Source, spans: list[tuple[Any, ...]],
                 result: Any, logs: list[bytes] | None = None) -> None:
        self.delivery, self.result = _Delivery(origin, source, spans, logs), result

    def __reduce__(self) -> tuple[Any, ...]:
        return (_arrive, (self.delivery, self.result))


def _arrive(delivery: _Delivery | None, result: Any) -> Any:
    if delivery is None:
        return result
    carried = Reply.__new__(Reply)
    carried.delivery, carried.result = delivery, result
    return carried


# -- spans on a task's exception ---------------------------------------------------------------


def stash(exc: BaseException, origin: Origin, spans: list[tuple[Any, ...]],
          logs: list[bytes] | None = None) -> None:
    """Let ``exc`` carry ``spans`` (and ``logs``) home without changing its type, args or
    traceback.

    First forgets what an earlier task stashed on the same object (a cached exception
    raised again, or returned as a value), so no span goes home twice. Then:

    * Mostly, an instance ``__reduce_ex__`` (`_Carry`): pickle looks the method up on the
      object, so the exception pickles as its own reduction with the spans in front,
      and they are delivered before the exception is rebuilt, even if rebuilding fails.
      It sends them once: it leaves the object as it pickles it.
    * Where the type has a reducer of its own in a dispatch table (tblib registers
      exceptions there), or will have one before the exception is pickled (in a Dask
      worker, which registers the type as it reports the error), the spans ride in the
      state, under `_KEY` (see `_Spans`). Such a reducer pickles the ``__dict__`` as it
      is and never asks for ``__reduce_ex__``, which would then cross as a stray
      attribute of the caller's exception.
    """
    vars(exc).pop("__reduce_ex__", None)
    vars(exc).pop(_KEY, None)
    if not spans and not logs:
        return
    delivery = _Delivery(origin, _source(), spans, logs)
    kind = type(exc)
    reducer = copyreg.dispatch_table.get(kind) or _private.forking_reducers().get(kind)
    if reducer is not None or _in_a_dask_worker():
        exc.__dict__[_KEY] = _Spans(delivery, exc.__suppress_context__)
        state = reducer(exc) if reducer is not None else kind.__reduce_ex__(exc, 2)
        if (isinstance(state, tuple) and len(state) > 2 and isinstance(state[2], dict)
                and _KEY in state[2]):
            return
        del exc.__dict__[_KEY]
        if reducer is not None:
            log.warning("spans of a failed task were not relayed: the reducer of %s drops "
                        "the exception's __dict__", kind.__qualname__)
            return
    exc.__reduce_ex__ = _Carry(exc, delivery)  # type: ignore[method-assign,assignment]


def _in_a_dask_worker() -> bool:
    """Whether this thread runs a Dask task: its worker will register tblib's reducer for
    the type of the task's error as it reports it (``distributed.core.error_message``)."""
    distributed: Any = sys.modules.get("distributed")
    if distributed is None:
        return False
    try:
        distributed.get_worker()
    except ValueError:  # "No worker found": not in a task of one
        return False
    return True


class _Carry:
    """An exception's ``__reduce_ex__`` for one trip: its own reduction, spans first."""

    __slots__ = ("delivery", "exc")

    def __init__(self, exc: BaseException, delivery: _Delivery) -> None:
        self.exc, self.delivery = exc, delivery

    def __call__(self, protocol: int) -> Any:
        exc = self.exc
        own = type(exc).__reduce_ex__(exc, protocol)
        if not (isinstance(own, tuple) and 2 <= len(own) <= 3):
            log.warning("spans of a failed task were not relayed: %s reduces to %r",
                        type(exc).__qualname__, type(own).__name__)
            return own
        state = own[2] if len(own) == 3 else None
        if isinstance(state, dict) and "__reduce_ex__" in state:
            state = {k: v for k, v in state.items() if k != "__reduce_ex__"} or None
        if not _wire.in_trial():  # sent: a later trip of this object carries nothing
            vars(exc).pop("__reduce_ex__", None)
        return (_rebuilt, (self.delivery, own[0], own[1], state))


def _rebuilt(delivery: object, make: Any, args: tuple[Any, ...], state: Any) -> Any:
    """The exception, after its spans were delivered (pickle's REDUCE, then BUILD)."""
    exc = make(*args)
    if state is not None:
        setstate = getattr(exc, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            exc.__dict__.update(state)
    return exc


_KEY = "__suppress_context__"


class _Spans:
    """Spans riding in an exception's state; unpickle as its ``__suppress_context__``.

    Exceptions pickle their ``__dict__`` as state, and ``BaseException.__setstate__``
    restores it with setattr (as tblib's reducers do). So an entry under the key
    ``__suppress_context__`` is unpickled, delivering the spans, into the exception's own
    ``__suppress_context__`` value, and then set through that attribute's descriptor: the
    exception arrives as it left, with no extra attribute. In the worker the descriptor
    hides the entry too.
    """

    __slots__ = ("delivery", "suppress")

    def __init__(self, delivery: _Delivery, suppress: bool) -> None:
        self.delivery: _Delivery | None = delivery
        self.suppress = suppress

    def __reduce__(self) -> tuple[Any, ...]:
        delivery = self.delivery
        if not _wire.in_trial():  # sent: a later trip of this object carries nothing
            self.delivery = None
        return (_suppress, (delivery, self.suppress))


def _suppress(delivery: object, suppress: bool) -> bool:
    return suppress


_resources: dict[tuple[int, Source], Resource] = {}


def deliver(source: Source, spans: list[tuple[Any, ...]]) -> None:
    """Hand relayed spans to the global provider's processors; never fail the task over it.

    Each goes through ``on_start`` and ``on_end`` once, as a span started here would:
    processors that act at start (adding attributes, from baggage or their own state) see
    worker spans too. The worker's attributes are applied again after ``on_start``, so a
    processor stamping this process's pid or thread does not overwrite the worker's.
    """
    provider = _otel.provider()
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
            _replay(encoded, resource, processor)
    except Exception:  # telemetry trouble never fails the user's job
        log.warning("could not deliver %d relayed spans", len(spans), exc_info=True)


class _Relayed(Span):
    """A worker's span, replayed here. The SDK builds spans only in a tracer (its ``Span``
    refuses to be made directly): a subclass, made by the relay, is the public way in."""


def _replay(encoded: tuple[Any, ...], resource: Resource, processor: Any) -> None:
    (name, context, parent, kind, start, end, attributes, events, links, code, description,
     scope, baggage) = encoded
    parent_context = None if parent is None else _context(parent)
    span = _Relayed(
        name=name,
        context=_context(context),
        parent=parent_context,
        resource=resource,
        attributes=attributes,
        events=[Event(n, a, timestamp=t) for n, t, a in events],
        links=[Link(_context(c), a) for c, a in links],
        kind=SpanKind(kind),
        span_processor=processor,
        instrumentation_scope=None if scope is None else InstrumentationScope(*scope),
    )
    span.start(start_time=start, parent_context=_otel.parent_context(parent_context, baggage or {}))
    if attributes:
        span.set_attributes(attributes)  # the worker's, over any a processor set at start
    if code != StatusCode.UNSET.value:
        span.set_status(Status(StatusCode(code), description))
    span.end(end_time=end)


def _identity(sc: SpanContext) -> tuple[_otel.SpanIdentity, bool]:
    """A span context as it travels home: its identity, and whether it is remote."""
    return _otel.identity(sc), sc.is_remote


def _context(travelled: tuple[_otel.SpanIdentity, bool]) -> SpanContext:
    return _otel.span_context(*travelled)


def _encode(span: ReadableSpan, baggage: dict[str, object] | None = None) -> tuple[Any, ...]:
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
        baggage,
    )


def _decode(encoded: tuple[Any, ...], resource: Resource) -> ReadableSpan:
    (name, context, parent, kind, start, end, attributes, events, links, code, description,
     scope, _) = encoded
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
