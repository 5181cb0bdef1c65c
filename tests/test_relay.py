"""propagate._relay: worker spans encoded, carried home on a result or an exception, delivered.

Unit level, in one process: the process pool tests (test_process.py) cover the trip
through real workers.
"""

from __future__ import annotations

import contextlib
import contextvars
import copyreg
import io
import logging
import os
import pickle
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.status import Status, StatusCode

from propagate import _relay
from tests.helpers import extra_state, one_span, with_processor

SCHEMA = "https://opentelemetry.io/schemas/1.21.0"
SOURCE = ("worker-host", 4242)  # where relayed spans were recorded: (host.name, process.pid)
PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED),
                     trace_state=TraceState([("vendor", "value")]))
LINKED = SpanContext(0x11112222333344445555666677778888, 0x1234567890ABCDEF, is_remote=False,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED))


class PlainUnpickler(pickle.Unpickler):
    """Refuses every class: what it loads is plain data, the same under any SDK version."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"not plain data: {module}.{name}")


ORIGIN_A = (1, "origin a")
ORIGIN_B = (2, "origin b")


class TaskFailed(Exception):
    """The user's own exception type (defined here, so no pickling hook knows it)."""


class TblibFailed(Exception):
    """An exception type given tblib's pickling support, as ``import distributed`` does."""


class DropsDict(Exception):
    """An exception whose pickling keeps only its args."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


@pytest.fixture
def worker_exporter() -> InMemorySpanExporter:
    """Spans recorded by a provider of their own, standing in for a worker's."""
    return InMemorySpanExporter()


@pytest.fixture
def worker_tracer(worker_exporter: InMemorySpanExporter) -> trace.Tracer:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(worker_exporter))
    return provider.get_tracer("tests.relay", "1.2.3", schema_url=SCHEMA)


def full_span(tracer: trace.Tracer, exporter: InMemorySpanExporter) -> ReadableSpan:
    """A finished span using every field the relay carries."""
    span = tracer.start_span(
        "encoded", context=trace.set_span_in_context(NonRecordingSpan(PARENT)),
        kind=SpanKind.CLIENT, start_time=1_000,
        attributes={"s": "text", "i": 7, "f": 0.5, "b": True, "seq": ("a", "b")},
        links=[Link(LINKED, {"why": "follows"})])
    span.add_event("retry", {"attempt": 2}, timestamp=1_500)
    span.set_status(Status(StatusCode.ERROR, "bad gateway"))
    span.end(end_time=2_000)
    [finished] = exporter.get_finished_spans()
    return finished


def encoded(tracer: trace.Tracer, exporter: InMemorySpanExporter, name: str) -> tuple[Any, ...]:
    """A simple span as a worker's collector encodes it."""
    with tracer.start_as_current_span(name):
        pass
    return _relay._encode(one_span(exporter, name))


def identity(sc: SpanContext) -> tuple[Any, ...]:
    return (sc.trace_id, sc.span_id, sc.trace_flags, tuple(sc.trace_state.items()), sc.is_remote)


@contextlib.contextmanager
def tblib_pickles(kind: type[BaseException]) -> Iterator[None]:
    """tblib's pickling for ``kind``, as ``import distributed`` installs it, for the block.

    tblib's hooks are process-wide: the other tests get back the pickling they had.
    """
    pickling_support = pytest.importorskip("tblib.pickling_support")
    saved = dict(copyreg.dispatch_table)
    try:
        pickling_support.install(kind)
        yield
    finally:
        copyreg.dispatch_table.clear()
        copyreg.dispatch_table.update(saved)


@contextlib.contextmanager
def own_reduction(kind: type[BaseException]) -> Iterator[None]:
    """``kind`` pickled by its own reduction, even if ``import distributed`` gave it tblib's."""
    tblib = copyreg.dispatch_table.pop(kind, None)
    try:
        yield
    finally:
        if tblib is not None:
            copyreg.dispatch_table[kind] = tblib


# -- encoding --------------------------------------------------------------------------------

def test_encode_decode_round_trip(worker_tracer: trace.Tracer,
                                  worker_exporter: InMemorySpanExporter) -> None:
    """I6: a span survives encode, pickle and decode with every field intact."""
    span = full_span(worker_tracer, worker_exporter)
    blob = pickle.dumps(_relay._encode(span))
    resource = Resource({"service.name": "parent", "process.pid": 4242})
    back = _relay._decode(PlainUnpickler(io.BytesIO(blob)).load(), resource)

    assert back.name == "encoded"
    assert back.context is not None and span.context is not None
    assert identity(back.context) == identity(span.context)
    assert back.parent is not None
    assert identity(back.parent) == identity(PARENT)  # remote, with its tracestate
    assert back.kind is SpanKind.CLIENT
    assert (back.start_time, back.end_time) == (1_000, 2_000)
    assert dict(back.attributes or {}) == {"s": "text", "i": 7, "f": 0.5, "b": True,
                                           "seq": ("a", "b")}
    assert [(e.name, e.timestamp, dict(e.attributes or {})) for e in back.events] == [
        ("retry", 1_500, {"attempt": 2})]
    assert [(identity(lk.context), dict(lk.attributes or {})) for lk in back.links] == [
        (identity(LINKED), {"why": "follows"})]
    assert (back.status.status_code, back.status.description) == (StatusCode.ERROR, "bad gateway")
    scope = back.instrumentation_scope
    assert scope is not None
    assert (scope.name, scope.version, scope.schema_url) == ("tests.relay", "1.2.3", SCHEMA)
    assert back.resource is resource
    # Whatever to_json shows of a span, the decoded one shows the same.
    assert _relay._decode(_relay._encode(span), span.resource).to_json() == span.to_json()


def test_root_span_without_scope_round_trips() -> None:
    """I6: a span with no parent and no instrumentation scope decodes to the same."""
    context = SpanContext(0xABC, 0xDEF, is_remote=False)
    span = ReadableSpan(name="bare", context=context, start_time=5, end_time=6)
    back = _relay._decode(pickle.loads(pickle.dumps(_relay._encode(span))), Resource({}))
    assert (back.name, back.parent, back.instrumentation_scope) == ("bare", None, None)
    assert back.context is not None
    assert identity(back.context) == identity(context)
    assert (back.start_time, back.end_time, back.kind) == (5, 6, SpanKind.INTERNAL)


# -- collecting in a worker ------------------------------------------------------------------

@pytest.fixture
def collector() -> Iterator[trace.Tracer]:
    """A provider whose only processor is the relay's collector, as in a worker; fresh state."""
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(_relay._COLLECTOR)
    _relay._origins.clear()
    _relay._strays.clear()
    yield provider.get_tracer("tests.relay")
    _relay._origins.clear()
    _relay._strays.clear()


def test_collector_keeps_each_batch_to_its_context(collector: trace.Tracer) -> None:
    """I6: spans ended in a batch's Context go to that batch, and to no other."""
    def task(name: str) -> list[tuple[Any, ...]]:
        batch = _relay.Batch(ORIGIN_A)
        with collector.start_as_current_span(name):
            pass
        return batch.close()

    first = contextvars.copy_context().run(task, "first")
    second = contextvars.copy_context().run(task, "second")
    assert [e[0] for e in first] == ["first"]
    assert [e[0] for e in second] == ["second"]


def test_span_ended_after_its_task_goes_home_with_its_origins_next(
        collector: trace.Tracer) -> None:
    """I6: a span a task left to a thread, ended after the task, rides with that origin's next.

    Two origins share the worker (a Dask worker serving two clients): the stray never goes
    to the other one.
    """
    def task(origin: tuple[int, str], name: str, leave: list[Any]) -> list[tuple[Any, ...]]:
        batch = _relay.Batch(origin)
        with collector.start_as_current_span(name):
            if leave is not None:
                leave.append((contextvars.copy_context(), collector.start_span("left")))
        return batch.close()

    left: list[Any] = []
    assert [e[0] for e in contextvars.copy_context().run(task, ORIGIN_A, "a1", left)] == ["a1"]
    [(ctx, span)] = left
    ctx.run(span.end)  # in the task's Context, after its batch closed
    assert [e[0] for e in contextvars.copy_context().run(task, ORIGIN_B, "b1", None)] == ["b1"]
    assert [e[0] for e in contextvars.copy_context().run(task, ORIGIN_A, "a2", None)] == [
        "a2", "left"]


def test_span_outside_any_task_goes_only_to_the_only_origin(collector: trace.Tracer) -> None:
    """I6: a span ended outside any task goes home with the worker's only origin, if one.

    A process pool's worker serves one parent; a worker shared by two origins cannot
    tell whose it is, and sends it to neither.
    """
    def task(origin: tuple[int, str]) -> list[str]:
        batch = _relay.Batch(origin)
        return [e[0] for e in batch.close()]

    assert contextvars.copy_context().run(task, ORIGIN_A) == []
    with collector.start_as_current_span("outside"):
        pass
    assert contextvars.copy_context().run(task, ORIGIN_A) == ["outside"]
    assert contextvars.copy_context().run(task, ORIGIN_B) == []
    with collector.start_as_current_span("whose"):
        pass
    assert contextvars.copy_context().run(task, ORIGIN_A) == []
    assert contextvars.copy_context().run(task, ORIGIN_B) == []


# -- delivery --------------------------------------------------------------------------------

def test_relay_enabled_with_sdk_provider() -> None:
    """I6: the session's SDK provider is somewhere for relayed spans to go."""
    assert _relay.enabled()
    assert _relay.here() == (os.getpid(), _relay.here()[1])


def test_deliver_to_session_provider(exporter: InMemorySpanExporter, worker_tracer: trace.Tracer,
                                     worker_exporter: InMemorySpanExporter) -> None:
    """I6: delivered spans reach the session's exporter, with its resource and the worker's pid."""
    batch = [encoded(worker_tracer, worker_exporter, "one"),
             encoded(worker_tracer, worker_exporter, "two")]
    _relay.deliver(SOURCE, batch)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["one", "two"]
    provider_resource = trace.get_tracer_provider().resource  # type: ignore[attr-defined]
    for span in spans:
        attributes = span.resource.attributes
        assert (attributes["host.name"], attributes["process.pid"]) == SOURCE
        for key, value in provider_resource.attributes.items():
            if key not in ("host.name", "process.pid"):
                assert attributes[key] == value, key


def test_reply_unpickles_home_as_the_result(exporter: InMemorySpanExporter,
                                            worker_tracer: trace.Tracer,
                                            worker_exporter: InMemorySpanExporter) -> None:
    """I6: a reply unpickled in its origin is the bare result, its spans delivered first."""
    reply = _relay.reply(_relay.here(), [encoded(worker_tracer, worker_exporter, "home")],
                         {"answer": 42})
    assert pickle.loads(pickle.dumps(reply)) == {"answer": 42}
    assert [s.name for s in exporter.get_finished_spans()] == ["home"]
    home = exporter.get_finished_spans()[0]
    assert home.resource.attributes["process.pid"] == os.getpid()  # pickled here, in this test


def test_reply_without_spans_is_the_bare_result() -> None:
    """I6: a task that recorded nothing sends its result as the stdlib would."""
    result = {"answer": 42}
    assert _relay.reply(_relay.here(), [], result) is result


def test_reply_elsewhere_keeps_carrying(exporter: InMemorySpanExporter,
                                        worker_tracer: trace.Tracer,
                                        worker_exporter: InMemorySpanExporter) -> None:
    """I6: a reply unpickled on the way (not its origin) stays a Reply and delivers nothing."""
    spans = [encoded(worker_tracer, worker_exporter, "in-transit")]
    elsewhere = (os.getpid() + 1, "another process")
    back = pickle.loads(pickle.dumps(_relay.reply(elsewhere, spans, 7)))
    assert isinstance(back, _relay.Reply)
    assert (back.delivery.origin, back.delivery.spans, back.result) == (elsewhere, spans, 7)
    assert exporter.get_finished_spans() == ()


def test_spans_ride_home_on_an_exception(exporter: InMemorySpanExporter,
                                         worker_tracer: trace.Tracer,
                                         worker_exporter: InMemorySpanExporter) -> None:
    """I6: a stashed exception delivers its spans once on unpickling; type and args unchanged."""
    exc = TaskFailed("boom", 1)
    _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "failed")])
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is TaskFailed
    assert back.args == ("boom", 1)
    assert extra_state(back) == {}
    assert back.__traceback__ is None
    assert [s.name for s in exporter.get_finished_spans()] == ["failed"]


def test_exception_elsewhere_delivers_nothing(exporter: InMemorySpanExporter,
                                              worker_tracer: trace.Tracer,
                                              worker_exporter: InMemorySpanExporter) -> None:
    """I6: an exception unpickled outside its origin delivers nothing and keeps no extra state."""
    exc = TaskFailed("k")
    _relay.stash(exc, (os.getpid() + 1, "another process"),
                 [encoded(worker_tracer, worker_exporter, "lost")])
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.args, extra_state(back)) == (TaskFailed, ("k",), {})
    assert exporter.get_finished_spans() == ()


def test_spans_ride_home_on_an_exception_tblib_pickles(
        exporter: InMemorySpanExporter, worker_tracer: trace.Tracer,
        worker_exporter: InMemorySpanExporter) -> None:
    """I7: under tblib's exception pickling (``import distributed``) the exception is unchanged."""
    with tblib_pickles(TblibFailed):
        exc = TblibFailed("boom")
        _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "tblib")])
        back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.args) == (TblibFailed, ("boom",))
    assert [s.name for s in exporter.get_finished_spans()] == ["tblib"]
    assert extra_state(back) == {}


def test_stash_without_spans_leaves_exception_alone() -> None:
    """I6: a failed task with no spans sends its exception untouched."""
    exc = RuntimeError("plain")
    _relay.stash(exc, _relay.here(), [])
    assert vars(exc) == {}


def test_spans_ride_on_an_exception_that_drops_its_dict(
        exporter: InMemorySpanExporter, worker_tracer: trace.Tracer,
        worker_exporter: InMemorySpanExporter) -> None:
    """I6: an exception whose own __reduce__ keeps only its args still carries its spans."""
    exc = DropsDict("custom")
    with own_reduction(DropsDict):
        _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "dropped")])
        back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.args, extra_state(back)) == (DropsDict, ("custom",), {})
    assert [s.name for s in exporter.get_finished_spans()] == ["dropped"]
    assert vars(exc) == {}  # sent: the worker's object is as it was


def test_exception_that_drops_its_dict_under_tblib_warns(
        caplog: pytest.LogCaptureFixture, worker_tracer: trace.Tracer,
        worker_exporter: InMemorySpanExporter) -> None:
    """I6: under tblib's pickling, which ends in the type's own reduction, an exception that
    drops its __dict__ cannot carry spans: it is left as it was, with a warning."""
    caplog.set_level(logging.WARNING, logger="propagate")
    with tblib_pickles(DropsDict):
        exc = DropsDict("custom")
        _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "dropped")])
        assert vars(exc) == {}
        assert pickle.loads(pickle.dumps(exc)).args == ("custom",)
    assert any("DropsDict" in r.getMessage() for r in caplog.records
               if r.name == "propagate" and r.levelno == logging.WARNING)


def test_reused_exception_sends_each_span_once(exporter: InMemorySpanExporter,
                                               worker_tracer: trace.Tracer,
                                               worker_exporter: InMemorySpanExporter) -> None:
    """I6: one exception object raised by several tasks (a cached error) sends each span once.

    Raised with spans, then without, then with others, then returned as a value: each
    trip delivers only what its own task recorded.
    """
    cached = TaskFailed("cached")
    names = []
    for spans in (["first"], [], ["second", "third"]):
        _relay.stash(cached, _relay.here(),
                     [encoded(worker_tracer, worker_exporter, n) for n in spans])
        back = pickle.loads(pickle.dumps(cached))
        assert (type(back), back.args, extra_state(back)) == (TaskFailed, ("cached",), {})
        names.append([s.name for s in exporter.get_finished_spans()])
        exporter.clear()
    assert names == [["first"], [], ["second", "third"]]
    pickle.loads(pickle.dumps(_relay.reply(_relay.here(), [], cached)))  # returned as a value
    assert exporter.get_finished_spans() == ()


def test_reused_tblib_exception_sends_each_span_once(
        exporter: InMemorySpanExporter, worker_tracer: trace.Tracer,
        worker_exporter: InMemorySpanExporter) -> None:
    """I6: the same under tblib's pickling, where the spans ride in the exception's state."""
    with tblib_pickles(TblibFailed):
        cached = TblibFailed("cached")
        _relay.stash(cached, _relay.here(), [encoded(worker_tracer, worker_exporter, "once")])
        pickle.loads(pickle.dumps(cached))
        pickle.loads(pickle.dumps(cached))  # pickled again, returned as a value: nothing more
        _relay.stash(cached, _relay.here(), [])
        pickle.loads(pickle.dumps(cached))
    assert [s.name for s in exporter.get_finished_spans()] == ["once"]


class NeedsTwo(Exception):
    """Pickles, but cannot be rebuilt: its __init__ wants two arguments, args holds one."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}{b}")


class Unloadable:
    """A result that pickles but cannot be unpickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse, ())


def _refuse() -> None:
    raise ValueError("cannot be rebuilt here")


def test_spans_arrive_when_the_exception_cannot_be_rebuilt(
        exporter: InMemorySpanExporter, worker_tracer: trace.Tracer,
        worker_exporter: InMemorySpanExporter) -> None:
    """I6: spans go first: an exception that fails to unpickle still delivered them, once."""
    exc = NeedsTwo("a", "b")
    with own_reduction(NeedsTwo):
        _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "before")])
        blob = pickle.dumps(exc)
    with pytest.raises(TypeError):
        pickle.loads(blob)
    assert [s.name for s in exporter.get_finished_spans()] == ["before"]


def test_spans_arrive_when_the_result_cannot_be_rebuilt(
        exporter: InMemorySpanExporter, worker_tracer: trace.Tracer,
        worker_exporter: InMemorySpanExporter) -> None:
    """I6: a result that fails to unpickle still delivered its spans, once, first."""
    reply = _relay.reply(_relay.here(), [encoded(worker_tracer, worker_exporter, "before")],
                         Unloadable())
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        pickle.loads(pickle.dumps(reply))
    assert [s.name for s in exporter.get_finished_spans()] == ["before"]


class StartStamper(SpanProcessor):
    """Acts at start, as the contrib BaggageSpanProcessor does, and stamps its own pid."""

    def __init__(self) -> None:
        self.started: list[tuple[str, Any, dict[str, object]]] = []
        self.ended: list[str] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        parent = trace.get_current_span(parent_context).get_span_context()
        self.started.append((span.name, parent, dict(baggage.get_all(parent_context))))
        for key, value in baggage.get_all(parent_context).items():
            span.set_attribute(f"baggage.{key}", str(value))
        span.set_attribute("process.pid", -1)

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span.name)


def test_relayed_spans_go_through_on_start_and_on_end_once(
        exporter: InMemorySpanExporter, worker_exporter: InMemorySpanExporter) -> None:
    """I6: start-time processors see worker spans: parent context and baggage, once each.

    What the worker recorded wins over what a processor stamps at start here.
    """
    stamper = StartStamper()
    collecting = TracerProvider(shutdown_on_exit=False)
    collecting.add_span_processor(SimpleSpanProcessor(worker_exporter))
    collecting.add_span_processor(_relay._COLLECTOR)
    tracer = collecting.get_tracer("tests.relay")
    ctx = baggage.set_baggage("tenant", "acme",
                              trace.set_span_in_context(NonRecordingSpan(PARENT)))
    batch = _relay.Batch(_relay.here())
    with tracer.start_as_current_span("worker", context=ctx,
                                      attributes={"process.pid": 4242}):
        pass
    spans = batch.close()
    with with_processor(stamper):
        pickle.loads(pickle.dumps(_relay.reply(_relay.here(), spans, None)))
    assert stamper.started == [("worker", PARENT, {"tenant": "acme"})]
    assert stamper.ended == ["worker"]
    [span] = exporter.get_finished_spans()
    assert span.attributes is not None
    assert (span.attributes["process.pid"], span.attributes["baggage.tenant"]) == (4242, "acme")
    assert span.parent is not None and identity(span.parent) == identity(PARENT)


@pytest.mark.parametrize("bad", [
    None,
    ("garbage",),
    "not a span",
    "kind",
    "status",
], ids=["none", "short-tuple", "string", "bad-kind", "bad-status"])
def test_malformed_batch_warns_and_never_raises(bad: Any, caplog: pytest.LogCaptureFixture,
                                                exporter: InMemorySpanExporter,
                                                worker_tracer: trace.Tracer,
                                                worker_exporter: InMemorySpanExporter) -> None:
    """I6: a malformed batch logs a warning and never fails the task, through deliver or a Reply."""
    caplog.set_level(logging.WARNING, logger="propagate")
    if bad in ("kind", "status"):  # a well-formed tuple carrying an impossible value
        fields = list(encoded(worker_tracer, worker_exporter, "tampered"))
        fields[3 if bad == "kind" else 9] = 99
        bad = tuple(fields)
    _relay.deliver(SOURCE, [bad])
    reply = _relay.reply(_relay.here(), [bad], "result")
    assert pickle.loads(pickle.dumps(reply)) == "result"
    warnings = [r for r in caplog.records if r.name == "propagate" and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("could not deliver" in r.getMessage() for r in warnings)
    assert exporter.get_finished_spans() == ()
