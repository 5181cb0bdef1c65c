"""propagate._relay: worker spans encoded, carried home on a result or an exception, delivered.

Unit level, in one process: the process pool tests (test_process.py) cover the trip
through real workers.
"""

from __future__ import annotations

import contextvars
import copyreg
import io
import logging
import os
import pickle
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
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
from tests.conftest import extra_state

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
    [finished] = [s for s in exporter.get_finished_spans() if s.name == name]
    return _relay._encode(finished)


def identity(sc: SpanContext) -> tuple[Any, ...]:
    return (sc.trace_id, sc.span_id, sc.trace_flags, tuple(sc.trace_state.items()), sc.is_remote)


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

def test_collector_keeps_each_batch_to_its_context() -> None:
    """I6: spans ended in a batch's Context go to that batch; stray ones ride with the next."""
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(_relay._COLLECTOR)
    tracer = provider.get_tracer("tests.relay")

    def task(name: str) -> list[tuple[Any, ...]]:
        batch = _relay.Batch()
        with tracer.start_as_current_span(name):
            pass
        return batch.close()

    with tracer.start_as_current_span("stray"):  # outside any batch
        pass
    first = contextvars.copy_context().run(task, "first")
    second = contextvars.copy_context().run(task, "second")
    assert [e[0] for e in first] == ["first", "stray"]
    assert [e[0] for e in second] == ["second"]


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
    assert (back.origin, back.spans, back.result) == (elsewhere, spans, 7)
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
    pickling_support = pytest.importorskip("tblib.pickling_support")
    saved = dict(copyreg.dispatch_table)
    try:
        pickling_support.install(TblibFailed)
        exc = TblibFailed("boom")
        _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "tblib")])
        back = pickle.loads(pickle.dumps(exc))
    finally:  # tblib's hooks are process-wide: leave the other tests the pickling they had
        copyreg.dispatch_table.clear()
        copyreg.dispatch_table.update(saved)
    assert (type(back), back.args) == (TblibFailed, ("boom",))
    assert [s.name for s in exporter.get_finished_spans()] == ["tblib"]
    assert extra_state(back) == {}


def test_stash_without_spans_leaves_exception_alone() -> None:
    """I6: a failed task with no spans sends its exception untouched."""
    exc = RuntimeError("plain")
    _relay.stash(exc, _relay.here(), [])
    assert vars(exc) == {}


def test_stash_on_exception_that_drops_its_dict(caplog: pytest.LogCaptureFixture,
                                                worker_tracer: trace.Tracer,
                                                worker_exporter: InMemorySpanExporter) -> None:
    """I6: an exception whose pickling drops __dict__ is left as it was, with a warning."""
    caplog.set_level(logging.WARNING, logger="propagate")
    exc = DropsDict("custom")
    _relay.stash(exc, _relay.here(), [encoded(worker_tracer, worker_exporter, "dropped")])
    assert vars(exc) == {}
    assert pickle.loads(pickle.dumps(exc)).args == ("custom",)
    assert any("DropsDict" in r.getMessage() for r in caplog.records
               if r.name == "propagate" and r.levelno == logging.WARNING)


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
