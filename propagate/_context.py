"""Detached contexts: what of the caller's context can cross to another process.

A thread gets a snapshot (``contextvars.copy_context()``) and needs nothing from here.
A process cannot: ``Context`` and ``ContextVar`` do not pickle. It gets a
`DetachedContext` instead: the trace identity of the current span (as a remote parent),
the baggage, and the values of the ContextVars registered with `register`.
"""

from __future__ import annotations

import contextvars
import pickle
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any, ClassVar, TypeVar

from . import _otel, _switch
from ._errors import ContextSerializationError
from ._span import heal, orphans

T = TypeVar("T")

_registry: dict[str, ContextVar[Any]] = {}
_stand_ins: set[str] = set()  # names created in a worker before their module registered them
_lock = threading.Lock()
_UNSET: Any = object()
_NO_VALUES: dict[str, object] = {}  # every capture's when none is registered: never changed


def register(var: ContextVar[T]) -> ContextVar[T]:
    """Carry ``var`` across processes: its value travels with every task, by name.

    Returns ``var``, so it can wrap the declaration:

        REQUEST_ID = propagate.register(ContextVar("request_id"))

    The name is the key on the other side, so registered names must be unique.
    """
    if not isinstance(var, ContextVar):
        raise TypeError(f"register() takes a contextvars.ContextVar, not {var!r}")
    with _lock:
        known = _registry.get(var.name)
        if known is not None and known is not var and var.name not in _stand_ins:
            raise ValueError(
                f"a different ContextVar named {var.name!r} is already registered; "
                "registered names must be unique because values cross processes by name"
            )
        if var.name in _stand_ins:  # templates set the stand-in: make them afresh
            _stand_ins.discard(var.name)
            _templates.clear()
        _registry[var.name] = var
    return var


def registered() -> dict[str, ContextVar[Any]]:
    """The registered ContextVars, by name."""
    with _lock:
        return dict(_registry)


def lookup(name: str) -> ContextVar[Any]:
    """The registered variable called ``name`` (the unpickling side of a ContextVar).

    In a worker process whose registering module was not imported, a stand-in is
    registered, so the function and the context that arrive together share one variable.
    """
    with _lock:
        var = _registry.get(name)
        if var is None:
            var = _registry[name] = ContextVar(name)
            _stand_ins.add(name)
        return var


class DetachedContext:
    """A picklable copy of what of the current context can cross a process boundary.

    Holds the current span's trace identity (it becomes a *remote* parent), the baggage,
    and the values of registered ContextVars. It holds no live span, no token and no
    cancellation: changes made where it is attached never flow back.
    """

    __slots__ = ("_baggage", "_identity", "_values")

    def __init__(
        self,
        identity: _otel.SpanIdentity | None = None,
        baggage: Mapping[str, object] | None = None,
        values: Mapping[str, object] | None = None,
    ) -> None:
        self._identity = identity
        self._baggage = dict(baggage or {})
        self._values = dict(values or {})

    @property
    def trace_id(self) -> int | None:
        """The trace id of the captured span, or None when there was no current span."""
        return None if self._identity is None else self._identity[0]

    @property
    def span_id(self) -> int | None:
        """The span id of the captured span: the remote parent of spans started under it."""
        return None if self._identity is None else self._identity[1]

    @property
    def baggage(self) -> Mapping[str, object]:
        """The captured OpenTelemetry baggage."""
        return dict(self._baggage)

    @property
    def values(self) -> Mapping[str, object]:
        """Registered ContextVar values, by variable name."""
        return dict(self._values)

    @contextmanager
    def attach(self) -> Iterator[DetachedContext]:
        """Make this context current on this thread; restore the previous one on exit."""
        state = enter(self._identity, self._baggage, self._values)
        try:
            yield self
        finally:
            leave(state)

    def to_carrier(self) -> dict[str, str]:
        """W3C ``traceparent``/``tracestate``/``baggage`` headers, through the global propagator.

        Registered ContextVar values are not part of a carrier.
        """
        return _otel.inject(self._identity, self._baggage)

    @classmethod
    def from_carrier(cls, carrier: Mapping[str, str]) -> DetachedContext:
        """Read a carrier back; a malformed one gives a context with no parent, never an error."""
        identity, found = _otel.extract(carrier)
        return cls(identity, found)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DetachedContext, (self._identity, self._baggage, self._values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DetachedContext):
            return NotImplemented
        return (self._identity, self._baggage, self._values) == (
            other._identity, other._baggage, other._values)

    __hash__: ClassVar[None] = None  # type: ignore[assignment]  # equal by value, mutable values

    def __repr__(self) -> str:
        ids = "no parent" if self._identity is None else (
            f"trace_id={self._identity[0]:032x} span_id={self._identity[1]:016x}")
        return f"<DetachedContext {ids} baggage={self._baggage!r} values={self._values!r}>"


def capture() -> DetachedContext:
    """The current context, detached: picklable, safe to attach anywhere, any number of times."""
    return DetachedContext(*capture_fields())


def capture_fields() -> tuple[_otel.SpanIdentity | None, dict[str, object], dict[str, object]]:
    """What `capture` holds, as plain values: identity, baggage, registered values.

    Shared with other captures (a task holds them until it is sent): callers must not
    change them.
    """
    if orphans:
        heal()
    values = _NO_VALUES
    if _registry:
        found = {}
        for name, var in list(_registry.items()):
            value = var.get(_UNSET)
            if value is not _UNSET:
                found[name] = value
        values = found or _NO_VALUES
    _switch.point("capture")
    identity, baggage = _otel.current_fields()  # shared with other captures: not changed
    for value in baggage.values():
        if type(value) is not str:
            baggage = {key: value if type(value) is str else _as_string(key, value)
                       for key, value in baggage.items()}
            break
    return identity, baggage, values


def _as_string(key: str, value: object) -> str:
    """A baggage value as OpenTelemetry carries it across processes: a string.

    Baggage is strings by the W3C spec, and OpenTelemetry's own propagator sends
    ``str(value)``; so does propagate, and a value that has no string fails here, naming
    its key, instead of in a worker.
    """
    try:
        return str(value)
    except Exception as exc:
        raise ContextSerializationError(
            f"baggage {key!r} holds a {type(value).__qualname__} that cannot be made a "
            f"string ({exc}); baggage crosses processes as strings") from exc


_State = tuple[object, list[tuple[ContextVar[Any], Token[Any]]]]


def task_context(context: object) -> tuple[contextvars.Context, Any] | None:
    """A new Context for one task, with the sealed ``context`` current in it, and its origin.

    The tasks of one request carry the same sealed context (`_wire.context`): the first
    makes a template, entering the context as `enter` does, and each runs in a copy of
    it, which ends with the task, so there is nothing to leave. None where a copy of a
    template would not be what entering gives, and the caller enters and leaves: this
    thread's context is not empty (the template would hold another's, or an old one), a
    jitter wants the attach and detach points, OpenTelemetry's runtime context is not
    scoped by Contexts, or the context is not sealed (its values are mutable: each task
    gets its own copy).
    """
    if type(context) is not bytes or _switch.hook is not None:
        return None
    here = contextvars.copy_context()
    if len(here) or not _otel.context_scoped():
        return None
    made = _templates.get(context)
    if made is None:
        identity, baggage, values, origin = pickle.loads(context)
        here.run(enter, identity, baggage, values)  # never left: the template ends unused
        if len(_templates) >= 64:  # one per request in flight: a few
            _templates.clear()
        made = _templates[context] = (here, origin)
    template, origin = made
    return template.copy(), origin


_templates: dict[bytes, tuple[contextvars.Context, Any]] = {}


def enter(identity: _otel.SpanIdentity | None, baggage: Mapping[str, object],
          values: Mapping[str, object]) -> _State:
    """Make a detached context current on this thread; `leave` undoes it, on this thread."""
    token = _otel.attach(_otel.build(identity, baggage))
    resets = []
    if values:
        try:
            for name, value in values.items():
                var = lookup(name)
                resets.append((var, var.set(value)))
        except BaseException:
            leave((token, resets))
            raise
    _switch.point("attach")
    return token, resets


def leave(state: _State) -> None:
    _switch.point("detach")
    token, resets = state
    for var, var_token in reversed(resets):
        var.reset(var_token)
    _otel.detach(token)
