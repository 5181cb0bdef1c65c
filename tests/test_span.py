"""propagate._span: thread-affine span scopes and the trace decorator, on the real SDK."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import gc
import inspect
import logging
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import opentelemetry.context as otel_context_api
import pytest
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import propagate
from tests.helpers import (
    THREADS,
    assert_ended_where_started,
    detach_failures,
    one_span,
    spans_named,
)

TRACER = trace.get_tracer("tests")


def span_id(span: Any) -> int:
    return int(span.get_span_context().span_id)


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def double_ends(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "on an ended span" in r.getMessage()]


def in_thread(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` on a fresh stdlib thread (its own context) and return its result."""
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="exiter") as pool:
        return pool.submit(fn, *args).result(timeout=10)


# span(): like start_as_current_span


def test_span_enters_and_exits_like_start_as_current_span(exporter: InMemorySpanExporter) -> None:
    """I4: span() makes its span current inside, restores the previous one after, passes kwargs."""
    with TRACER.start_as_current_span("outer") as outer:
        with propagate.span("inner", attributes={"k": "v"}, kind=SpanKind.CLIENT) as inner:
            assert trace.get_current_span() is inner
            assert inner.is_recording()
        assert trace.get_current_span() is outer
        assert not inner.is_recording()
    exported = one_span(exporter, "inner")
    assert exported.attributes == {"k": "v"}
    assert exported.kind is SpanKind.CLIENT
    assert parent_id(exported) == span_id(outer)
    assert exported.status.status_code is StatusCode.UNSET
    assert_ended_where_started()


def test_span_records_exception(exporter: InMemorySpanExporter) -> None:
    """I7: an exception in span() is recorded, sets status ERROR and reaches the caller as is."""
    error = ValueError("boom")
    with pytest.raises(ValueError) as info, propagate.span("failing"):
        raise error
    assert info.value is error
    exported = one_span(exporter, "failing")
    assert exported.status.status_code is StatusCode.ERROR
    assert exported.status.description == "ValueError: boom"
    assert [e.name for e in exported.events] == ["exception"]
    assert not trace.get_current_span().get_span_context().is_valid
    assert_ended_where_started()


def test_span_exception_options_pass_through(exporter: InMemorySpanExporter) -> None:
    """I7: record_exception and set_status_on_exception work as for start_as_current_span."""
    quiet = propagate.span("quiet", record_exception=False, set_status_on_exception=False)
    with pytest.raises(KeyError), quiet:
        raise KeyError("k")
    exported = one_span(exporter, "quiet")
    assert exported.events == ()
    assert exported.status.status_code is StatusCode.UNSET


def test_double_exit_raises() -> None:
    """I4: exiting a span() scope twice is a RuntimeError, not a second end."""
    scope = propagate.span("twice")
    scope.__enter__()
    scope.__exit__(None, None, None)
    with pytest.raises(RuntimeError, match="exited without being entered"):
        scope.__exit__(None, None, None)


def test_double_enter_raises(exporter: InMemorySpanExporter) -> None:
    """I4: entering the same span() object twice is a RuntimeError; the first scope is intact."""
    scope = propagate.span("once")
    with scope as first:
        with pytest.raises(RuntimeError, match="already entered"):
            scope.__enter__()
        assert trace.get_current_span() is first
    assert [s.name for s in exporter.get_finished_spans()] == ["once"]


# I4: the hyper pattern, entered on the caller, exited on a blocking worker thread


def test_plain_opentelemetry_cross_thread_exit_corrupts(exporter: InMemorySpanExporter,
                                                        caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """I4: the baseline: plain OpenTelemetry (its default runtime context, even where the
    suite runs under OTEL_PYTHON_CONTEXT=propagate) logs "Failed to detach context", sticks
    the caller."""
    monkeypatch.setattr(otel_context_api, "_RUNTIME_CONTEXT", ContextVarsRuntimeContext())
    def scenario() -> None:
        scope = TRACER.start_as_current_span("dns")
        dns = scope.__enter__()
        in_thread(scope.__exit__, None, None, None)
        assert detach_failures(caplog.records)
        assert trace.get_current_span() is dns  # stuck on a span that has ended
        assert not dns.is_recording()
        with TRACER.start_as_current_span("later") as later:
            assert later.parent is not None and later.parent.span_id == span_id(dns)
        ended_on = THREADS.ended[span_id(dns)]
        assert ended_on != threading.get_ident()

    # a copy of the context, so the corruption stays out of the rest of the test
    contextvars.copy_context().run(scenario)
    caplog.clear()


def test_cross_thread_exit_heals_on_entering_thread(exporter: InMemorySpanExporter,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """I4: a scope exited on another thread is ended once, on the entering thread, when it heals."""
    here = threading.current_thread()
    times: dict[str, int] = {}

    def exit_elsewhere(scope: propagate.span) -> None:
        times["before exit"] = time.time_ns()
        scope.__exit__(None, None, None)
        times["after exit"] = time.time_ns()

    with TRACER.start_as_current_span("caller") as caller:
        scope = propagate.span("dns")
        dns = scope.__enter__()
        with pytest.warns(propagate.CrossThreadExitWarning) as warned:
            in_thread(exit_elsewhere, scope)
        message = str(warned[0].message)
        assert repr(here.name) in message and "'exiter_0'" in message
        assert not exporter.get_finished_spans()  # not ended on the exiting thread
        times["heal"] = time.time_ns()
        propagate.capture()  # the entering thread's next propagate call heals it
        assert trace.get_current_span() is caller
        with TRACER.start_as_current_span("later") as later:
            pass
    dns_span = one_span(exporter, "dns")
    assert THREADS.ended[span_id(dns)] == here.ident
    assert THREADS.started[span_id(dns)] == here.ident
    assert dns_span.end_time is not None
    assert times["before exit"] <= dns_span.end_time <= times["after exit"] <= times["heal"]
    assert parent_id(one_span(exporter, "later")) == span_id(caller)
    assert span_id(later) != span_id(dns)
    assert_ended_where_started()
    assert not detach_failures(caplog.records) and not double_ends(caplog)


def test_cross_thread_exit_heals_when_next_span_entered(exporter: InMemorySpanExporter) -> None:
    """I4: entering the next propagate.span heals first: its parent is the caller's span."""
    with TRACER.start_as_current_span("caller") as caller:
        scope = propagate.span("dns")
        dns = scope.__enter__()
        with pytest.warns(propagate.CrossThreadExitWarning):
            in_thread(scope.__exit__, None, None, None)
        with propagate.span("next"):
            pass
        assert trace.get_current_span() is caller
    assert parent_id(one_span(exporter, "next")) == span_id(caller)
    assert THREADS.ended[span_id(dns)] == threading.get_ident()
    assert_ended_where_started()


def test_cross_thread_exit_records_error(exporter: InMemorySpanExporter) -> None:
    """I4: an exception passed to a foreign exit is recorded; the span still ends on heal."""
    scope = propagate.span("dns")
    scope.__enter__()
    with pytest.warns(propagate.CrossThreadExitWarning):
        in_thread(scope.__exit__, OSError, OSError("unreachable"), None)
    propagate.capture()
    exported = one_span(exporter, "dns")
    assert exported.status.status_code is StatusCode.ERROR
    assert [e.name for e in exported.events] == ["exception"]
    assert not trace.get_current_span().get_span_context().is_valid


def test_heal_waits_until_span_is_current_again(exporter: InMemorySpanExporter) -> None:
    """I4: healing only resets the entering Context while the exited span is its current one."""
    with TRACER.start_as_current_span("caller") as caller:
        scope = propagate.span("dns")
        dns = scope.__enter__()
        with pytest.warns(propagate.CrossThreadExitWarning):
            in_thread(scope.__exit__, None, None, None)
        with TRACER.start_as_current_span("inside") as inside:
            propagate.capture()  # "dns" is not current here: leave this context alone
            assert trace.get_current_span() is inside
        assert trace.get_current_span() is dns
        propagate.capture()
        assert trace.get_current_span() is caller
    assert len(spans_named(exporter, "dns")) == 1
    assert_ended_where_started()


def test_nested_cross_thread_exits_heal_in_one_call(exporter: InMemorySpanExporter) -> None:
    """I4: two nested scopes exited (inner first) on another thread both heal at the next call."""
    with TRACER.start_as_current_span("caller") as caller:
        outer, inner = propagate.span("outer"), propagate.span("inner")
        outer.__enter__()
        inner.__enter__()

        def exit_both() -> None:
            inner.__exit__(None, None, None)
            outer.__exit__(None, None, None)

        with pytest.warns(propagate.CrossThreadExitWarning):
            in_thread(exit_both)
        detached = propagate.capture()
        assert detached.span_id == span_id(caller)
        assert trace.get_current_span() is caller
    assert {s.name for s in exporter.get_finished_spans()} == {"outer", "inner", "caller"}
    assert_ended_where_started()


def test_cross_thread_exit_after_entering_thread_finished(exporter: InMemorySpanExporter) -> None:
    """I4: when the entering thread is gone, a foreign exit ends the span right there, once."""
    scopes: list[propagate.span] = []

    def enter() -> None:
        scope = propagate.span("orphan")
        scope.__enter__()
        scopes.append(scope)

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()
    with pytest.warns(propagate.CrossThreadExitWarning):
        scopes[0].__exit__(None, None, None)
    assert one_span(exporter, "orphan").end_time is not None


def test_cross_thread_exit_after_entering_thread_finished_holds_nothing(
        exporter: InMemorySpanExporter) -> None:
    """I5: a scope exited after its entering thread finished is not kept alive by propagate."""
    scopes: list[propagate.span] = []
    spans: list[trace.Span] = []

    def enter() -> None:
        scope = propagate.span("orphan")
        spans.append(scope.__enter__())
        scopes.append(scope)

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join(timeout=10)
    with pytest.warns(propagate.CrossThreadExitWarning):
        scopes[0].__exit__(None, None, None)
    assert one_span(exporter, "orphan")
    ref = weakref.ref(spans[0])
    del spans[:], scopes[:]
    gc.collect()
    assert ref() is None, [type(r) for r in gc.get_referrers(ref())]


# I4 in asyncio: exited in another task's Context on the same thread


def test_cross_task_exit_heals_in_entering_task(exporter: InMemorySpanExporter,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """I4: a scope exited by another task ends once, on its thread; the entering task heals."""
    seen: dict[str, Any] = {}

    async def entering(handoff: asyncio.Queue[propagate.span], done: asyncio.Event) -> None:
        with TRACER.start_as_current_span("entering-task") as mine:
            scope = propagate.span("dns")
            seen["dns"] = scope.__enter__()
            await handoff.put(scope)
            await asyncio.wait_for(done.wait(), timeout=10)
            assert trace.get_current_span() is seen["dns"]  # not yet healed
            propagate.capture()
            assert trace.get_current_span() is mine
            with propagate.span("after") as after:
                seen["after"] = after
            seen["entering-task"] = mine

    async def exiting(handoff: asyncio.Queue[propagate.span], done: asyncio.Event) -> None:
        with TRACER.start_as_current_span("exiting-task") as mine:
            scope = await asyncio.wait_for(handoff.get(), timeout=10)
            with pytest.warns(propagate.CrossThreadExitWarning) as warned:
                scope.__exit__(None, None, None)
            seen["message"] = str(warned[0].message)
            assert trace.get_current_span() is mine  # the foreign context is untouched
            done.set()

    async def main() -> None:
        handoff: asyncio.Queue[propagate.span] = asyncio.Queue()
        done = asyncio.Event()
        await asyncio.gather(
            asyncio.create_task(entering(handoff, done), name="enterer"),
            asyncio.create_task(exiting(handoff, done), name="exiter"))

    asyncio.run(main())
    assert "'enterer'" in seen["message"] and "'exiter'" in seen["message"]
    assert len(spans_named(exporter, "dns")) == 1
    assert parent_id(one_span(exporter, "after")) == span_id(seen["entering-task"])
    assert_ended_where_started()
    assert not detach_failures(caplog.records) and not double_ends(caplog)


def test_cross_thread_exit_from_executor_in_asyncio(exporter: InMemorySpanExporter) -> None:
    """I4: hyper's pattern in asyncio: a scope exited in the default executor heals in its task."""
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        with TRACER.start_as_current_span("request") as request:
            scope = propagate.span("dns")
            dns = scope.__enter__()
            with pytest.warns(propagate.CrossThreadExitWarning, match="task 'resolver'"):
                await loop.run_in_executor(None, scope.__exit__, None, None, None)
            await propagate.to_thread(int)  # the task's next propagate call heals it
            assert trace.get_current_span() is request
            with propagate.span("connect"):
                pass
            return span_id(request), span_id(dns)

    async def resolver() -> tuple[int, int]:
        return await asyncio.create_task(main(), name="resolver")

    request_id, dns_id = asyncio.run(resolver())
    assert THREADS.ended[dns_id] == THREADS.started[dns_id]
    assert parent_id(one_span(exporter, "connect")) == request_id
    assert len(spans_named(exporter, "dns")) == 1


def test_cross_task_exit_after_entering_task_finished_holds_nothing(
        exporter: InMemorySpanExporter) -> None:
    """I5: a scope exited by another task, whose entering task then finished, is not kept alive."""
    refs: list[weakref.ref[trace.Span]] = []

    async def entering() -> propagate.span:
        scope = propagate.span("dns")
        refs.append(weakref.ref(scope.__enter__()))
        return scope  # finishes without another propagate call

    async def main() -> None:
        scope = await asyncio.create_task(entering())
        with pytest.warns(propagate.CrossThreadExitWarning):
            scope.__exit__(None, None, None)

    asyncio.run(main())
    assert one_span(exporter, "dns")
    gc.collect()
    assert refs[0]() is None, [type(r) for r in gc.get_referrers(refs[0]())]


# trace: functions and coroutines


def test_trace_sync_function_bare_and_named(exporter: InMemorySpanExporter) -> None:
    """I4: trace names the span after the function or name=, makes it current, and keeps the
    parent."""
    @propagate.trace
    def bare(x: int) -> Any:
        return x, trace.get_current_span()

    @propagate.trace(name="custom")
    def named() -> Any:
        return trace.get_current_span()

    @propagate.trace()
    def called() -> None:
        pass

    with TRACER.start_as_current_span("caller") as caller:
        value, inside = bare(3)
        named_inside = named()
        called()
        assert trace.get_current_span() is caller
    assert value == 3
    assert bare.__name__ == "bare"
    assert one_span(exporter, bare.__qualname__).context.span_id == span_id(inside)
    assert one_span(exporter, "custom").context.span_id == span_id(named_inside)
    for s in exporter.get_finished_spans():
        if s.name != "caller":
            assert parent_id(s) == span_id(caller)
    assert_ended_where_started()


def test_trace_records_exception(exporter: InMemorySpanExporter) -> None:
    """I7: a traced function's exception is recorded and reaches the caller unchanged."""
    @propagate.trace(name="failing")
    def failing() -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        failing()
    assert one_span(exporter, "failing").status.status_code is StatusCode.ERROR


def test_traced_coroutines_gathered_are_siblings(exporter: InMemorySpanExporter) -> None:
    """I4: five traced coroutines gathered under a caller span are five siblings."""
    @propagate.trace(name="child")
    async def child(i: int) -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001 * (5 - i))
        return span_id(trace.get_current_span())

    async def main() -> tuple[int, list[int]]:
        with TRACER.start_as_current_span("caller") as caller:
            ids = await asyncio.gather(*(child(i) for i in range(5)))
            assert trace.get_current_span() is caller
            return span_id(caller), ids

    caller_id, ids = asyncio.run(main())
    children = spans_named(exporter, "child")
    assert len(children) == 5
    assert sorted(s.context.span_id for s in children) == sorted(ids)
    assert all(parent_id(s) == caller_id for s in children)
    assert_ended_where_started()


# trace: generators


def test_traced_generator(exporter: InMemorySpanExporter) -> None:
    """I4: a traced generator's span is current in its body only, never in the consumer."""
    @propagate.trace(name="gen")
    def gen(n: int) -> Generator[Any, Any, str]:
        received = []
        for _ in range(n):
            received.append((yield trace.get_current_span()))
        return f"received {received}"

    with TRACER.start_as_current_span("consumer") as consumer:
        g = gen(2)
        inside = next(g)
        assert trace.get_current_span() is consumer
        assert g.send("a") is inside
        assert trace.get_current_span() is consumer
        with pytest.raises(StopIteration) as stop:
            g.send("b")
        assert stop.value.value == "received ['a', 'b']"
    exported = one_span(exporter, "gen")
    assert exported.context.span_id == span_id(inside)
    assert parent_id(exported) == span_id(consumer)
    assert_ended_where_started()


def test_traced_generator_throw(exporter: InMemorySpanExporter) -> None:
    """I7: throw() reaches the generator body; an uncaught one is recorded and propagates."""
    @propagate.trace(name="gen")
    def gen() -> Iterator[str]:
        try:
            yield "first"
        except KeyError:
            yield "caught"
        yield "last"

    g = gen()
    assert next(g) == "first"
    assert g.throw(KeyError("k")) == "caught"
    assert not trace.get_current_span().get_span_context().is_valid
    with pytest.raises(ValueError, match="uncaught"):
        g.throw(ValueError("uncaught"))
    exported = one_span(exporter, "gen")
    assert exported.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in exported.events] == ["ValueError"]
    assert_ended_where_started()


def test_traced_generator_body_exception(exporter: InMemorySpanExporter) -> None:
    """I7: an exception raised by the generator body is recorded and reaches the consumer."""
    @propagate.trace(name="gen")
    def gen() -> Iterator[int]:
        yield 1
        raise LookupError("body")

    with pytest.raises(LookupError, match="body"):
        list(gen())
    assert one_span(exporter, "gen").status.status_code is StatusCode.ERROR
    assert_ended_where_started()


def test_traced_generator_closed_on_another_thread(exporter: InMemorySpanExporter,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """I4: a traced generator closed on another thread logs nothing, corrupts nothing, ends once."""
    closed: list[bool] = []

    @propagate.trace(name="gen")
    def gen() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    with TRACER.start_as_current_span("consumer") as consumer:
        g = gen()
        for _ in g:
            break

        def close_here() -> Any:
            with TRACER.start_as_current_span("closer") as closer:
                g.close()
                return trace.get_current_span() is closer

        assert in_thread(close_here)
        assert trace.get_current_span() is consumer
    assert closed == [True]
    assert len(spans_named(exporter, "gen")) == 1
    assert not detach_failures(caplog.records) and not double_ends(caplog)


def test_traced_async_generator(exporter: InMemorySpanExporter) -> None:
    """I4: a traced async generator's span is current in its body only; asend, athrow pass."""
    @propagate.trace(name="agen")
    async def agen() -> AsyncIterator[Any]:
        got = yield trace.get_current_span()
        try:
            yield got
        except KeyError:
            yield "caught"

    async def main() -> tuple[int, int]:
        with TRACER.start_as_current_span("consumer") as consumer:
            a = agen()
            inside = await a.__anext__()
            assert trace.get_current_span() is consumer
            assert await a.asend("sent") == "sent"
            assert trace.get_current_span() is consumer
            assert await a.athrow(KeyError("k")) == "caught"
            with pytest.raises(StopAsyncIteration):
                await a.__anext__()
            return span_id(consumer), span_id(inside)

    consumer_id, inside_id = asyncio.run(main())
    exported = one_span(exporter, "agen")
    assert exported.context.span_id == inside_id
    assert parent_id(exported) == consumer_id
    assert exported.status.status_code is StatusCode.UNSET
    assert_ended_where_started()


def test_traced_async_generator_exception(exporter: InMemorySpanExporter) -> None:
    """I7: an exception in a traced async generator's body is recorded and propagates."""
    @propagate.trace(name="agen")
    async def agen() -> AsyncIterator[int]:
        yield 1
        raise LookupError("body")

    async def main() -> None:
        with pytest.raises(LookupError, match="body"):
            async for _ in agen():
                pass

    asyncio.run(main())
    assert one_span(exporter, "agen").status.status_code is StatusCode.ERROR
    assert_ended_where_started()


def test_traced_async_generator_closed_by_another_task(exporter: InMemorySpanExporter,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """I4: an async generator left in one task and closed in another logs, corrupts nothing."""
    closed: list[bool] = []

    @propagate.trace(name="agen")
    async def agen() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(True)

    async def consume(a: AsyncIterator[int]) -> None:
        with TRACER.start_as_current_span("consumer") as consumer:
            async for _ in a:
                break
            assert trace.get_current_span() is consumer
            await asyncio.sleep(0.01)
            assert trace.get_current_span() is consumer

    async def close(a: Any) -> None:
        with TRACER.start_as_current_span("closer") as closer:
            await a.aclose()
            assert trace.get_current_span() is closer

    async def main() -> None:
        a = agen()
        consumer = asyncio.create_task(consume(a))
        await asyncio.sleep(0)  # the consumer breaks out first
        await asyncio.gather(consumer, asyncio.create_task(close(a)))
        assert not trace.get_current_span().get_span_context().is_valid

    asyncio.run(main())
    assert closed == [True]
    assert len(spans_named(exporter, "agen")) == 1
    assert not detach_failures(caplog.records) and not double_ends(caplog)
    assert_ended_where_started()


def test_foreign_exit_under_warnings_as_errors_still_ends_the_span(
        exporter: InMemorySpanExporter) -> None:
    """I4: when the warning is an error, the span is still ended and the caller still heals."""
    scope = propagate.span("strict")
    span = scope.__enter__()
    errors: list[BaseException] = []

    def exit_elsewhere() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("error", propagate.CrossThreadExitWarning)
            try:
                scope.__exit__(None, None, None)
            except propagate.CrossThreadExitWarning as exc:
                errors.append(exc)

    worker = threading.Thread(target=exit_elsewhere)
    worker.start()
    worker.join(timeout=10)
    assert len(errors) == 1
    propagate.capture()  # heals this thread
    assert trace.get_current_span() is not span
    assert [s.name for s in exporter.get_finished_spans()] == ["strict"]


# Status on BaseException: what the installed OpenTelemetry's start_as_current_span does

RAISED = [ValueError("boom"), asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3),
          GeneratorExit()]


def outcome(exporter: InMemorySpanExporter, name: str) -> tuple[Any, str | None, int]:
    """A finished span's status code, description and number of exception events."""
    s = one_span(exporter, name)
    return s.status.status_code, s.status.description, len(s.events)


def raise_in(scope: Any, exc: BaseException) -> None:
    with pytest.raises(type(exc)), scope:
        raise exc


@pytest.mark.parametrize("exc", RAISED, ids=lambda e: type(e).__name__)
def test_span_status_matches_start_as_current_span(exporter: InMemorySpanExporter,
                                                   exc: BaseException) -> None:
    """I7: span() marks each exception exactly as start_as_current_span does here."""
    raise_in(TRACER.start_as_current_span("otel"), exc)
    raise_in(propagate.span("ours"), exc)
    assert outcome(exporter, "ours") == outcome(exporter, "otel")


def _kinds(exc: BaseException) -> list[Callable[[], None]]:
    """Drive each kind trace decorates into raising ``exc`` from its body."""
    @propagate.trace(name="ours")
    def function() -> None:
        raise exc

    @propagate.trace(name="ours")
    async def coroutine() -> None:
        raise exc

    @propagate.trace(name="ours")
    def generator() -> Iterator[int]:
        yield 1
        raise exc

    @propagate.trace(name="ours")
    async def async_generator() -> AsyncIterator[int]:
        yield 1
        raise exc

    async def drain() -> None:
        async for _ in async_generator():
            pass

    return [function, lambda: asyncio.run(coroutine()), lambda: list(generator()),
            lambda: asyncio.run(drain())]


@pytest.mark.parametrize("kind", range(4), ids=["function", "coroutine", "generator",
                                                 "async-generator"])
@pytest.mark.parametrize("exc", RAISED[:4], ids=lambda e: type(e).__name__)
def test_trace_status_matches_start_as_current_span(exporter: InMemorySpanExporter,
                                                    exc: BaseException, kind: int) -> None:
    """I7: every kind trace decorates marks each exception as start_as_current_span does."""
    raise_in(TRACER.start_as_current_span("otel"), exc)
    with pytest.raises(type(exc)):
        _kinds(exc)[kind]()
    assert outcome(exporter, "ours") == outcome(exporter, "otel")


def test_cancelled_coroutine_status_matches_start_as_current_span(
        exporter: InMemorySpanExporter) -> None:
    """I7: a traced coroutine cancelled from outside ends as OpenTelemetry ends cancellation."""
    @propagate.trace(name="ours")
    async def waits() -> None:
        await asyncio.sleep(60)

    async def main() -> None:
        task = asyncio.ensure_future(waits())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    raise_in(TRACER.start_as_current_span("otel"), asyncio.CancelledError())
    assert outcome(exporter, "ours") == outcome(exporter, "otel")


def test_cross_thread_exit_warning_points_at_the_exiting_line() -> None:
    """I4: CrossThreadExitWarning names the file and line of the code that exited the scope."""
    scope = propagate.span("moved")
    scope.__enter__()
    seen: list[tuple[str, int, int]] = []

    def exit_elsewhere() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
            scope.__exit__(None, None, None)
        seen.extend((w.filename, w.lineno, line) for w in caught)

    worker = threading.Thread(target=exit_elsewhere)
    worker.start()
    worker.join(60)
    with propagate.span("heal"):  # the entering thread's next propagate call heals it
        pass
    [(filename, lineno, line)] = seen
    assert (filename, lineno) == (__file__, line)


# Scopes whose entering Context can never run again end promptly, and nothing is kept


def enter_and_return(name: str) -> tuple[propagate.span, weakref.ref[trace.Span]]:
    """A pool task that opens a scope and returns it still open."""
    scope = propagate.span(name)
    return scope, weakref.ref(scope.__enter__())


def test_scope_left_open_by_a_finished_task_ends_at_its_exit(
        exporter: InMemorySpanExporter) -> None:
    """I4, I5: exited after its pool task ended, a scope ends there and nothing is retained."""
    with propagate.ThreadPoolExecutor(1) as pool:
        scope, ref = pool.submit(enter_and_return, "left-open").result(timeout=60)
        with pytest.warns(propagate.CrossThreadExitWarning):
            scope.__exit__(None, None, None)
        assert one_span(exporter, "left-open")  # now, not at interpreter exit
        assert not propagate._span.orphans
        del scope
        gc.collect()
        assert ref() is None, [type(r) for r in gc.get_referrers(ref())]


def test_scope_exited_while_its_task_runs_ends_when_the_task_ends(
        exporter: InMemorySpanExporter) -> None:
    """I4: exited on another thread mid-task, a scope ends when the task ends, on its thread."""
    opened, exited = threading.Event(), threading.Event()
    box: list[propagate.span] = []

    def task() -> int:
        scope = propagate.span("mid-task")
        scope.__enter__()
        box.append(scope)
        opened.set()
        exited.wait(60)
        return threading.get_ident()

    with propagate.ThreadPoolExecutor(1) as pool:
        future = pool.submit(task)
        opened.wait(60)
        with pytest.warns(propagate.CrossThreadExitWarning):
            box[0].__exit__(None, None, None)
        assert not spans_named(exporter, "mid-task")
        exited.set()
        worker = future.result(timeout=60)
    span = one_span(exporter, "mid-task")
    assert THREADS.ended[span.context.span_id] == worker
    assert not propagate._span.orphans


def test_many_scopes_left_open_retain_nothing(exporter: InMemorySpanExporter) -> None:
    """I5: 2,000 scopes left open by pool tasks and exited elsewhere leave no orphan behind."""
    with propagate.ThreadPoolExecutor(2) as pool, warnings.catch_warnings():
        warnings.simplefilter("ignore", propagate.CrossThreadExitWarning)
        futures = [pool.submit(enter_and_return, "many") for _ in range(2000)]
        for future in futures:
            future.result(timeout=60)[0].__exit__(None, None, None)
    assert not propagate._span.orphans
    assert len(spans_named(exporter, "many")) == 2000


def test_scopes_waiting_for_their_thread_end_before_the_provider_shuts_down() -> None:
    """I4, I9: a span whose entering thread never heals ends as the provider shuts down, and
    reaches the exporter; nothing ends after it (nothing is logged)."""
    script = textwrap.dedent("""
        import threading, warnings
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import propagate

        warnings.simplefilter("ignore", propagate.CrossThreadExitWarning)
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        entered, release, scopes = threading.Event(), threading.Event(), []

        def hold():
            scopes.append(propagate.span("held"))
            scopes[0].__enter__()
            entered.set()
            release.wait(60)  # alive, but never back in propagate: it never heals

        thread = threading.Thread(target=hold)
        thread.start()
        entered.wait(60)
        scopes[0].__exit__(None, None, None)  # elsewhere: waits for its thread
        before = len(exporter.get_finished_spans())
        provider.shutdown()
        print(before, [s.name for s in exporter.get_finished_spans()])
        release.set()
        thread.join(60)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["0", "['held']"]
    assert done.stderr == ""


# The caller's tracer, attributes and kind; span as a decorator

LIBRARY = trace.get_tracer("a.library", "1.2")


def _scope_of(exporter: InMemorySpanExporter, name: str) -> tuple[str, str | None]:
    scope = one_span(exporter, name).instrumentation_scope
    assert scope is not None
    return scope.name, scope.version


def test_span_starts_with_the_callers_tracer(exporter: InMemorySpanExporter) -> None:
    """API: span(tracer=...) keeps the caller's instrumentation scope; by default it is
    propagate's own, and start_as_current_span's keywords reach the span."""
    with propagate.span("theirs", tracer=LIBRARY, kind=SpanKind.CLIENT, attributes={"k": 1}):
        pass
    with propagate.span("ours"):
        pass
    assert _scope_of(exporter, "theirs") == ("a.library", "1.2")
    assert _scope_of(exporter, "ours")[0] == "propagate"
    theirs = one_span(exporter, "theirs")
    assert theirs.kind is SpanKind.CLIENT and dict(theirs.attributes or {}) == {"k": 1}


def _decorated_kinds(decorate: Callable[[Any], Any]) -> list[Callable[[], Any]]:
    """One of each kind of callable, decorated, and a way to call it to the end."""
    @decorate
    def function() -> int:
        return 1

    @decorate
    async def coroutine() -> int:
        return 1

    @decorate
    def generator() -> Iterator[int]:
        yield 1

    @decorate
    async def async_generator() -> AsyncIterator[int]:
        yield 1

    async def drain() -> list[int]:
        return [x async for x in async_generator()]

    return [function, lambda: asyncio.run(coroutine()), lambda: list(generator()),
            lambda: asyncio.run(drain())]


KINDS = ["function", "coroutine", "generator", "async-generator"]


@pytest.mark.parametrize("kind", range(4), ids=KINDS)
def test_trace_takes_a_tracer_attributes_and_kind(exporter: InMemorySpanExporter,
                                                  kind: int) -> None:
    """API: trace(tracer=, attributes=, kind=) gives every kind of callable's spans the
    caller's instrumentation scope, the attributes and the kind."""
    decorate = propagate.trace(name="traced", tracer=LIBRARY, attributes={"k": "v"},
                               kind=SpanKind.SERVER)
    _decorated_kinds(decorate)[kind]()
    span = one_span(exporter, "traced")
    assert _scope_of(exporter, "traced") == ("a.library", "1.2")
    assert span.kind is SpanKind.SERVER and dict(span.attributes or {}) == {"k": "v"}


@pytest.mark.parametrize("kind", range(4), ids=KINDS)
def test_span_decorates_as_start_as_current_span_does(exporter: InMemorySpanExporter,
                                                      kind: int) -> None:
    """API, I4: a span used as a decorator starts a new span, as it would be started, at
    each call, ended on the thread that started it; the decorated callable works twice."""
    call = _decorated_kinds(propagate.span("decorated", tracer=LIBRARY,
                                           attributes={"k": "v"}))[kind]
    with propagate.span("caller") as caller:
        call()
        call()
    spans = spans_named(exporter, "decorated")
    assert len(spans) == 2 and spans[0].context.span_id != spans[1].context.span_id
    for span in spans:
        assert span.parent is not None
        assert span.parent.span_id == caller.get_span_context().span_id
        assert dict(span.attributes or {}) == {"k": "v"}
    assert _scope_of(exporter, "caller")[0] == "propagate"
    assert_ended_where_started()


def test_decorating_span_keeps_the_error_options(exporter: InMemorySpanExporter) -> None:
    """I7: record_exception=False and set_status_on_exception=False hold for a decorating
    span and a traced generator, as for a span entered with ``with``."""
    @propagate.span("quiet", record_exception=False, set_status_on_exception=False)
    def fails() -> Iterator[int]:
        yield 1
        raise ValueError("boom")

    with pytest.raises(ValueError):
        list(fails())
    span = one_span(exporter, "quiet")
    assert span.events == () and span.status.status_code is StatusCode.UNSET
