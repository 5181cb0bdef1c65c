"""propagate/_context.py: capture, DetachedContext (attach, carriers, pickling) and register."""

from __future__ import annotations

import contextvars
import pickle
import uuid
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

import propagate
from propagate import DetachedContext
from tests.helpers import with_baggage

MISSING = object()


def unique(prefix: str) -> str:
    """A ContextVar name no other test registers: the registry is process-global."""
    return f"test_context.{prefix}.{uuid.uuid4().hex}"


@pytest.fixture
def registered() -> contextvars.ContextVar[Any]:
    return propagate.register(contextvars.ContextVar(unique("var")))


def span_ids() -> tuple[int, int, bool]:
    sc = trace.get_current_span().get_span_context()
    return sc.trace_id, sc.span_id, sc.is_remote


# capture


def test_capture_holds_span_baggage_and_set_registered_values(tracer, registered):
    """I1: capture() holds the span's ids, the baggage and the registered values that are set."""
    unset = propagate.register(contextvars.ContextVar(unique("unset")))
    token = registered.set("value-1")
    try:
        with tracer.start_as_current_span("current") as current, with_baggage(user="alice"):
            detached = propagate.capture()
    finally:
        registered.reset(token)

    assert detached.trace_id == current.get_span_context().trace_id
    assert detached.span_id == current.get_span_context().span_id
    assert dict(detached.baggage) == {"user": "alice"}
    assert detached.values[registered.name] == "value-1"
    assert unset.name not in detached.values


def test_capture_follows_every_change_of_the_current_context(tracer):
    """I1: captures of one context are read once and given again: a span or baggage that
    changes, and a context that comes back, are each seen as they are then."""
    with tracer.start_as_current_span("a") as a:
        first = propagate.capture()
        with tracer.start_as_current_span("b") as b, with_baggage(tenant="acme"):
            inner = propagate.capture()
            with with_baggage(tenant="other", count=3):
                changed = propagate.capture()
                twice = propagate.capture()
                assert baggage.get_baggage("count") == 3  # OpenTelemetry's own is untouched
        again = propagate.capture()
    assert first.span_id == again.span_id == a.get_span_context().span_id
    assert first.baggage == again.baggage == {}
    assert inner.span_id == b.get_span_context().span_id
    assert inner.baggage == {"tenant": "acme"}
    assert changed.baggage == twice.baggage == {"tenant": "other", "count": "3"}  # as sent


def test_capture_without_span_has_no_parent():
    """I1: with no current span, capture() holds no trace identity."""
    detached = propagate.capture()
    assert detached.trace_id is None
    assert detached.span_id is None


def test_capture_ignores_unregistered_vars():
    """I1: an unregistered ContextVar is not part of a detached context."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar(unique("unregistered"))

    def body() -> DetachedContext:
        var.set("local only")
        return propagate.capture()

    assert var.name not in contextvars.copy_context().run(body).values


def test_capture_pickles_equal(tracer, registered):
    """I1: a detached context survives pickling unchanged."""
    token = registered.set({"id": 7})
    try:
        with tracer.start_as_current_span("current"), with_baggage(k="v"):
            detached = propagate.capture()
    finally:
        registered.reset(token)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        clone = pickle.loads(pickle.dumps(detached, protocol))
        assert clone == detached
        assert clone.values == {registered.name: {"id": 7}}


# attach


def test_attach_makes_remote_parent_current(tracer, exporter, registered):
    """I1: attach() makes the captured span the current, remote parent, with baggage and values."""
    token = registered.set("captured")
    try:
        with tracer.start_as_current_span("origin") as origin, with_baggage(k="v"):
            detached = propagate.capture()
    finally:
        registered.reset(token)

    origin_ctx = origin.get_span_context()
    with detached.attach() as attached:
        assert attached is detached
        assert span_ids() == (origin_ctx.trace_id, origin_ctx.span_id, True)
        assert baggage.get_baggage("k") == "v"
        assert registered.get() == "captured"
        with tracer.start_as_current_span("child"):
            pass
    child = exporter.get_finished_spans()[-1]
    assert child.name == "child"
    assert child.parent.span_id == origin_ctx.span_id
    assert child.parent.is_remote


def test_attach_restores_previous_context(tracer, registered):
    """I2: leaving attach() restores exactly the previous context and registered values."""
    detached = DetachedContext((1, 2, 1, ()), {"k": "v"}, {registered.name: "attached"})
    with tracer.start_as_current_span("before"):
        before = otel_context.get_current()
        with detached.attach():
            assert registered.get() == "attached"
        assert otel_context.get_current() is before
    assert registered.get(MISSING) is MISSING


def test_attach_restores_on_exception(registered):
    """I2: leaving attach() by an exception also restores the previous context."""
    detached = DetachedContext((1, 2, 1, ()), {"k": "v"}, {registered.name: "attached"})
    before = otel_context.get_current()
    token = registered.set("outer")
    try:
        with pytest.raises(KeyError), detached.attach():
            raise KeyError("inside")
        assert otel_context.get_current() is before
        assert registered.get() == "outer"
    finally:
        registered.reset(token)


def test_attach_twice_nested(registered):
    """I2: one detached context may be attached twice, nested, and each exit restores its level."""
    first = DetachedContext((1, 2, 1, ()), {}, {registered.name: "first"})
    second = DetachedContext((3, 4, 1, ()), {}, {registered.name: "second"})
    with first.attach():
        with first.attach():
            assert span_ids() == (1, 2, True)
        with second.attach():
            assert span_ids() == (3, 4, True)
            assert registered.get() == "second"
        assert span_ids() == (1, 2, True)
        assert registered.get() == "first"
    assert span_ids() == (0, 0, False)
    assert registered.get(MISSING) is MISSING


def test_attach_does_not_flow_back_to_detached_context(registered):
    """I2: changes made while attached do not change the detached context."""
    detached = DetachedContext(None, {}, {registered.name: "original"})
    with detached.attach():
        registered.set("changed inside")
    assert detached.values == {registered.name: "original"}
    with detached.attach():
        assert registered.get() == "original"


# carriers


def test_to_carrier_is_w3c(tracer):
    """I1: to_carrier() gives a W3C traceparent and baggage header."""
    with tracer.start_as_current_span("current") as current, with_baggage(user="alice"):
        carrier = propagate.capture().to_carrier()
    sc = current.get_span_context()
    assert carrier["traceparent"] == (
        f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{int(sc.trace_flags):02x}")
    assert sc.trace_flags.sampled
    assert carrier["baggage"] == "user=alice"
    assert all(isinstance(v, str) for v in carrier.values())


def test_to_carrier_without_span_is_empty():
    """I1: a context with no parent and no baggage gives an empty carrier."""
    assert DetachedContext().to_carrier() == {}


def test_carrier_round_trip(tracer):
    """I1: from_carrier(to_carrier()) keeps trace id, span id and baggage."""
    with tracer.start_as_current_span("current"), with_baggage(a="1", b="two"):
        detached = propagate.capture()
    back = DetachedContext.from_carrier(detached.to_carrier())
    assert (back.trace_id, back.span_id) == (detached.trace_id, detached.span_id)
    assert dict(back.baggage) == {"a": "1", "b": "two"}
    with back.attach():
        assert span_ids() == (detached.trace_id, detached.span_id, True)


def test_carrier_leaves_registered_values_out(registered):
    """I1: registered ContextVar values are not part of a carrier."""
    detached = DetachedContext((1, 2, 1, ()), {}, {registered.name: "secret"})
    assert "secret" not in str(detached.to_carrier())
    assert DetachedContext.from_carrier(detached.to_carrier()).values == {}


VALID = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MALFORMED = [
    {"traceparent": "garbage"},
    {"traceparent": VALID.replace("00-", "ff-", 1)},  # version ff is forbidden
    {"traceparent": VALID + "-extra"},  # version 00 takes no extra fields
    {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
    {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},
    {"traceparent": VALID.upper()},
    {"traceparent": 123},
    {"traceparent": None},
    {"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"traceparent": ["garbage", 1]},
    {"baggage": 5},
    {"baggage": "=;==,,%%"},
    {},
    None,
    42,
    "traceparent",
    ["traceparent"],
    object(),
]


def carrier_id(carrier: object) -> str:
    """A stable test id (xdist needs the same ids in every worker: no addresses)."""
    return type(carrier).__name__ if type(carrier) is object else repr(carrier)


@pytest.mark.parametrize("carrier", MALFORMED, ids=carrier_id)
def test_malformed_carrier_is_new_root(carrier, tracer, exporter):
    """I7: a malformed carrier gives a context with no parent and never raises."""
    detached = DetachedContext.from_carrier(carrier)
    assert detached.trace_id is None
    assert detached.span_id is None
    with detached.attach():
        assert span_ids() == (0, 0, False)
        with tracer.start_as_current_span("root"):
            pass
    assert exporter.get_finished_spans()[-1].parent is None


# register


def test_register_returns_var():
    """I7: register(var) returns the very variable it was given."""
    var: contextvars.ContextVar[int] = contextvars.ContextVar(unique("returned"))
    assert propagate.register(var) is var


def test_register_same_var_twice():
    """I7: registering the same variable twice is allowed."""
    var: contextvars.ContextVar[int] = contextvars.ContextVar(unique("twice"))
    assert propagate.register(var) is var
    assert propagate.register(var) is var


def test_register_name_clash_raises():
    """I7: a different variable with a registered name is refused, with the name in the message."""
    name = unique("clash")
    propagate.register(contextvars.ContextVar(name))
    with pytest.raises(ValueError, match=name):
        propagate.register(contextvars.ContextVar(name))


@pytest.mark.parametrize("bad", ["name", None, 1, object()], ids=carrier_id)
def test_register_non_contextvar_raises(bad):
    """I7: register() refuses anything but a ContextVar with TypeError."""
    with pytest.raises(TypeError, match="ContextVar"):
        propagate.register(bad)


# the Context a detached task runs in (in the worker: here, in an empty Context, as there)


def detached_task(fn: Any, values: dict[str, object], identity: Any = None) -> tuple[Any, ...]:
    """A task as a worker receives it: its context sealed, sent from nowhere (no relay)."""
    from propagate import _wire

    return _wire.envelope(fn, (), {}, (None, 0, False, True, None),
                          _wire.context(identity, {}, values, None))


def run_in_worker(task: tuple[Any, ...]) -> Any:
    from propagate._executor import run_detached

    return contextvars.Context().run(run_detached, *task)  # a worker's context is empty


def test_registering_a_stand_in_makes_the_templates_afresh():
    """I1: a value that arrived before its variable was registered (a stand-in held it)
    reaches the registered variable once its module registers it, with the same context."""
    from propagate import _context

    name = unique("late")
    values = {name: "v"}
    assert run_in_worker(detached_task(lambda: _context.lookup(name).get(), values)) == "v"
    late = propagate.register(contextvars.ContextVar(name))
    assert run_in_worker(detached_task(lambda: late.get(MISSING), values)) == "v"


class _PerThread(otel_context.context._RuntimeContext):  # type: ignore[misc]
    """A runtime context that keeps the current context per thread, not per Context."""

    def __init__(self) -> None:
        import threading

        self._local = threading.local()

    def attach(self, context: otel_context.Context) -> object:
        previous = self.get_current()
        self._local.current = context
        return previous

    def get_current(self) -> otel_context.Context:
        return getattr(self._local, "current", otel_context.Context())

    def detach(self, token: object) -> None:
        self._local.current = token


def test_a_runtime_context_kept_per_thread_is_entered_and_left(tracer):
    """I4: with a runtime context not scoped by Contexts, each task enters its context and
    leaves it, on this thread: nothing stays current after the task."""
    from propagate import _otel

    with tracer.start_as_current_span("request"):
        identity = _otel.current_identity()
    saved = otel_context._RUNTIME_CONTEXT
    otel_context._RUNTIME_CONTEXT = _PerThread()
    _otel.context_scoped.cache_clear()
    try:
        assert not _otel.context_scoped()
        seen = run_in_worker(detached_task(span_ids, {}, identity))
        after = span_ids()
    finally:
        otel_context._RUNTIME_CONTEXT = saved
        _otel.context_scoped.cache_clear()
    assert seen == (identity[0], identity[1], True)
    assert after == (0, 0, False)
    assert _otel.context_scoped()
