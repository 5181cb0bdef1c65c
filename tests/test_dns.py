"""propagate.dns: lookups on their own threads, with the caller's span and a dns.lookup child.

Only ``localhost`` is ever resolved, with the real ``socket.getaddrinfo``; failures are
local (an unknown service name); timeouts use an injected lookup that blocks on an Event
until the test releases it. No test sends a query to any DNS server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import gc
import logging
import multiprocessing
import pickle
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.resolver import ThreadedResolver
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import propagate
import propagate.dns
from propagate._slots import Slots
from propagate.dns import AiohttpResolver, LookupTimeout, Resolver
from tests.helpers import THREADS, one_span, spans_named

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("tests.test_dns.var", default="unset")
HELD: contextvars.ContextVar[object] = contextvars.ContextVar("tests.test_dns.held")
PREFIX = "propagate-dns"
WAIT = 10.0  # seconds: a bound on every wait, never reached when things work


class SlowLookup:
    """``socket.getaddrinfo`` that blocks until released: the injected slow lookup."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[int] = set()
        self.running = 0
        self.most_running = 0
        self.seen_pending: list[int] = []  # the resolver's pending count at each call
        self.seen_held: list[int] = []  # its pool's queued work items plus those running
        self.watch: Resolver | None = None  # the resolver whose counts to record at each call
        self.delays: dict[Any, float] = {}  # seconds to take, once released, by port
        self._lock = threading.Lock()

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                 flags: int = 0) -> list[Any]:
        with self._lock:
            self.calls.append((host, port))
            self.threads.add(threading.get_ident())
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            if self.watch is not None:
                self.seen_pending.append(self.watch.pending)
                queued = self.watch._pool._work_queue.qsize()
                if not self.watch._closed:  # else the queue may hold close()'s Nones
                    self.seen_held.append(queued + self.running)
        try:
            if not self.release.wait(WAIT):
                raise RuntimeError("the test never released the slow lookup")
            time.sleep(self.delays.get(port, 0.0))
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        finally:
            with self._lock:
                self.running -= 1


@contextmanager
def released(slow: SlowLookup) -> Iterator[SlowLookup]:
    """Release the slow lookup however the test ends."""
    try:
        yield slow
    finally:
        slow.release.set()


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class LoopThread:
    """An event loop run by a thread of its own, which the test stops, restarts and closes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread()
        self.start()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        wait_until(self.loop.is_running)

    def stop(self) -> None:
        """Stop the loop, leaving what it has not run yet for a restart."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()

    def close(self) -> None:
        """Close the loop without running its tasks, then close their coroutines.

        That is what the garbage collector does to them, done now: it must give back
        nothing more than they hold.
        """
        if self.loop.is_running():
            self.stop()
        self.loop.close()
        for task in asyncio.all_tasks(self.loop):
            task._log_destroy_pending = False  # type: ignore[attr-defined]  # left on purpose
            task.get_coro().close()

    def run(self, coro: Coroutine[Any, Any, Any]) -> cf.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


def lookup_threads() -> dict[int, str]:
    """The live lookup threads, by ident."""
    return {t.ident or 0: t.name for t in threading.enumerate() if t.name.startswith(PREFIX)}


def lookups(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """Every finished ``dns.lookup`` span."""
    return spans_named(exporter, "dns.lookup")


def only_lookup(exporter: InMemorySpanExporter) -> ReadableSpan:
    """The one finished ``dns.lookup`` span."""
    return one_span(exporter, "dns.lookup")


def assert_child_on_lookup_thread(span: ReadableSpan, parent: trace.Span,
                                  threads: dict[int, str]) -> None:
    """I1, I4: ``span`` is ``parent``'s child, started and ended on one lookup thread."""
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.context.trace_id == parent.get_span_context().trace_id
    started = THREADS.started[span.context.span_id]
    assert THREADS.ended[span.context.span_id] == started
    assert started != threading.get_ident()
    assert threads[started] == span.attributes["thread.name"]


def in_span(body: Callable[[trace.Span], Awaitable[Any]]) -> Any:
    """asyncio.run ``body(caller)`` inside a caller span, with VAR set."""
    async def main() -> Any:
        VAR.set("caller")
        with propagate.span("caller") as caller:
            return await body(caller)

    return asyncio.run(main())


# the hyper scenario


def test_hyper_scenario(exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture) -> None:
    """I4: request spans stay on the loop; each dns.lookup enters and exits on a lookup thread."""
    # hyper entered the caller's span on the blocking thread, and per-task subscribers made
    # that panic. Here each request is its own asyncio task (its own Context), with a
    # thread-affine propagate.span that warns if exited elsewhere.
    caplog.set_level(logging.DEBUG)
    current: dict[int, int] = {}  # span current during a lookup -> the thread it ran on

    def watching(*question: Any) -> list[Any]:
        span_id = trace.get_current_span().get_span_context().span_id
        current[span_id] = threading.get_ident()
        return socket.getaddrinfo(*question)

    async def request(resolver: Resolver, i: int) -> trace.Span:
        with propagate.span(f"request {i}") as span:
            await resolver.getaddrinfo("localhost", 8000 + i)
            assert trace.get_current_span() is span
            return span

    async def main() -> tuple[list[trace.Span], dict[int, str]]:
        with Resolver(max_workers=2, getaddrinfo=watching) as resolver:
            spans = await asyncio.gather(*(request(resolver, i) for i in range(6)))
            return spans, lookup_threads()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        requests, threads = asyncio.run(main())
    assert [w for w in caught if issubclass(w.category, propagate.CrossThreadExitWarning)] == []
    assert caught == []
    assert not [r for r in caplog.records if "Failed to detach context" in r.getMessage()]
    children = {s.parent.span_id: s for s in lookups(exporter) if s.parent is not None}
    assert len(children) == len(requests) == 6
    for i, request_span in enumerate(requests):
        child = children[request_span.get_span_context().span_id]
        assert child.attributes["server.port"] == 8000 + i
        assert_child_on_lookup_thread(child, request_span, threads)
        assert current[child.context.span_id] == THREADS.started[child.context.span_id]
        request_id = request_span.get_span_context().span_id
        assert THREADS.started[request_id] == threading.get_ident()
        assert THREADS.ended[request_id] == threading.get_ident()


# what a lookup returns and records


def test_answers_match_loop_getaddrinfo(exporter: InMemorySpanExporter) -> None:
    """API: Resolver.getaddrinfo returns what loop.getaddrinfo returns, for every argument."""
    questions: list[tuple[Any, ...]] = [
        ("localhost", 80), ("localhost", "80"), (b"localhost", None), ("localhost", 0),
        ("localhost", 443, socket.AF_INET, socket.SOCK_STREAM),
        ("localhost", 53, 0, socket.SOCK_DGRAM, socket.IPPROTO_UDP, socket.AI_CANONNAME),
    ]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        with Resolver(max_workers=1) as resolver:
            for question in questions:
                assert await resolver.getaddrinfo(*question) == await loop.getaddrinfo(
                    *question[:2],
                    **dict(zip(["family", "type", "proto", "flags"], question[2:], strict=False)))

    asyncio.run(main())
    assert len(lookups(exporter)) == len(questions)


def test_span_attributes(exporter: InMemorySpanExporter) -> None:
    """API: dns.lookup records the name, the port, the answers and the lookup thread."""
    async def body(caller: trace.Span) -> tuple[Any, dict[int, str]]:
        with Resolver(max_workers=1) as resolver:
            return await resolver.getaddrinfo("localhost", 8080), lookup_threads()

    answer, threads = in_span(body)
    span = only_lookup(exporter)
    attributes = dict(span.attributes or {})
    assert attributes.pop("dns.question.name") == "localhost"
    assert attributes.pop("server.port") == 8080
    assert attributes.pop("dns.answer.count") == len(answer) > 0
    assert list(attributes.pop("dns.answers")) == list(dict.fromkeys(a[4][0] for a in answer))
    name = attributes.pop("thread.name")
    assert name.startswith(PREFIX + "_")
    assert threads[THREADS.started[span.context.span_id]] == name
    assert isinstance(attributes.pop("thread.id"), int)
    assert attributes == {}
    assert span.status.status_code is StatusCode.UNSET


def test_span_attributes_of_odd_questions(exporter: InMemorySpanExporter) -> None:
    """API: bytes are decoded, a numeric service is a port number, a service name stays a string."""
    with Resolver(max_workers=1) as resolver:
        resolver.resolve(b"localhost", b"80")
        resolver.resolve("localhost", "http")
        resolver.resolve("localhost", None)
    first, second, third = sorted(lookups(exporter), key=lambda s: s.start_time or 0)
    assert first.attributes is not None and second.attributes is not None
    assert (first.attributes["dns.question.name"], first.attributes["server.port"]) == (
        "localhost", 80)
    assert second.attributes["server.port"] == "http"
    assert third.attributes is not None and "server.port" not in third.attributes


def test_resolve_is_the_blocking_form(exporter: InMemorySpanExporter) -> None:
    """I1, I4: resolve() blocks, answers as socket.getaddrinfo; its span is on a lookup thread."""
    with Resolver(max_workers=1) as resolver, propagate.span("caller") as caller:
        assert resolver.resolve("localhost", 80, 0, socket.SOCK_STREAM) == socket.getaddrinfo(
            "localhost", 80, 0, socket.SOCK_STREAM)
        threads = lookup_threads()
    assert_child_on_lookup_thread(only_lookup(exporter), caller, threads)


def test_module_level_functions(exporter: InMemorySpanExporter) -> None:
    """I1, I4: propagate.dns.getaddrinfo and resolve use the shared default resolver."""
    async def body(caller: trace.Span) -> tuple[trace.Span, dict[int, str]]:
        loop = asyncio.get_running_loop()
        assert await propagate.dns.getaddrinfo("localhost", 80) == await loop.getaddrinfo(
            "localhost", 80)
        return caller, lookup_threads()

    caller, threads = in_span(body)
    with propagate.span("sync caller") as sync_caller:
        assert propagate.dns.resolve("localhost", 80) == socket.getaddrinfo("localhost", 80)
        threads.update(lookup_threads())
    first, second = sorted(lookups(exporter), key=lambda s: s.start_time or 0)
    assert_child_on_lookup_thread(first, caller, threads)
    assert_child_on_lookup_thread(second, sync_caller, threads)
    assert propagate.dns._default_resolver() is propagate.dns._default_resolver()


DEFAULT_RESOLVER = textwrap.dedent("""
    import asyncio, atexit, sys, threading

    def check_closed():  # registered first, so it runs after propagate.dns's own atexit hook
        print("closed at exit:", resolver._closed, dns._default is None)

    atexit.register(check_closed)
    import propagate.dns as dns

    assert "aiohttp" not in sys.modules, "propagate.dns imported aiohttp"
    assert dns._default is None
    assert not [t for t in threading.enumerate() if t.name.startswith("propagate-dns")]
    answer = dns.resolve("localhost", 80)
    resolver = dns._default
    assert resolver is not None
    assert asyncio.run(dns.getaddrinfo("localhost", 80)) == answer
    assert dns._default is resolver
    print("resolved:", len(answer) > 0)
""")


def test_default_resolver_lazy_and_closed_at_exit() -> None:
    """I8: with no provider nor aiohttp, the default resolver is made on use, closed at exit."""
    done = subprocess.run([sys.executable, "-W", "error", "-c", DEFAULT_RESOLVER],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["resolved: True", "closed at exit: True True"]
    assert done.stderr == ""


def _resolve_in_child(queue: Any) -> None:
    queue.put(propagate.dns.resolve("localhost", 80))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_default_resolver_after_fork() -> None:
    """I7: a forked child makes its own default resolver instead of hanging on the parent's."""
    assert propagate.dns.resolve("localhost", 80)  # the parent's default resolver exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_resolve_in_child, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=WAIT) == socket.getaddrinfo("localhost", 80)
    finally:
        child.join(WAIT)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


# context: what crosses, what does not


def test_context_crosses_and_changes_stay(exporter: InMemorySpanExporter) -> None:
    """I1, I2: the lookup sees the caller's ContextVars and baggage; its changes never flow back."""
    seen: list[tuple[str, object]] = []

    def nosy(host: Any, port: Any, *args: int) -> list[Any]:
        seen.append((VAR.get(), baggage.get_baggage("tenant")))
        VAR.set("changed by the lookup")
        otel_context.attach(baggage.set_baggage("tenant", "lookup's"))  # left attached
        return socket.getaddrinfo(host, port, *args)

    async def body(caller: trace.Span) -> None:
        token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
        try:
            with Resolver(max_workers=1, getaddrinfo=nosy) as resolver:
                await resolver.getaddrinfo("localhost", 80)
                assert (VAR.get(), baggage.get_baggage("tenant")) == ("caller", "acme")
                VAR.set("second")
                await resolver.getaddrinfo("localhost", 80)  # the same worker thread
        finally:
            otel_context.detach(token)

    in_span(body)
    assert seen == [("caller", "acme"), ("second", "acme")]


def test_no_references_held(exporter: InMemorySpanExporter) -> None:
    """I5: nothing of the caller's context is held once a lookup has finished."""
    class Payload:
        pass

    def call(resolver: Resolver) -> weakref.ref[Payload]:
        payload = Payload()
        HELD.set(payload)
        resolver.resolve("localhost", 80)
        asyncio.run(resolver.getaddrinfo("localhost", 80))
        return weakref.ref(payload)

    with Resolver(max_workers=1) as resolver:
        ref = contextvars.copy_context().run(call, resolver)

        def collected() -> bool:
            gc.collect()
            return ref() is None

        wait_until(collected)  # the worker drops its work item just after answering


# errors


def test_gaierror_reaches_the_caller_unchanged(exporter: InMemorySpanExporter) -> None:
    """I7: the gaierror socket.getaddrinfo raised is the one the caller gets; the span is ERROR."""
    raised: list[BaseException] = []

    def recording(*question: Any) -> list[Any]:
        try:
            return socket.getaddrinfo(*question)
        except socket.gaierror as exc:
            raised.append(exc)
            raise

    async def body(caller: trace.Span) -> tuple[BaseException, BaseException, dict[int, str]]:
        with Resolver(max_workers=1, getaddrinfo=recording) as resolver:
            with pytest.raises(socket.gaierror) as in_async:
                await resolver.getaddrinfo("localhost", "no-such-service")
            with pytest.raises(socket.gaierror) as in_sync:
                resolver.resolve("localhost", "no-such-service")
            return in_async.value, in_sync.value, lookup_threads()

    async_error, sync_error, threads = in_span(body)
    assert [async_error, sync_error] == raised
    assert async_error is raised[0] and sync_error is raised[1]
    with pytest.raises(socket.gaierror) as direct:
        socket.getaddrinfo("localhost", "no-such-service")
    assert type(async_error) is socket.gaierror and async_error.args == direct.value.args
    for span, error in zip(sorted(lookups(exporter), key=lambda s: s.start_time or 0), raised,
                           strict=True):
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == f"gaierror: {error}"
        assert [e.name for e in span.events] == ["exception"]
        assert span.attributes is not None and span.attributes["server.port"] == "no-such-service"
        started = THREADS.started[span.context.span_id]
        assert THREADS.ended[span.context.span_id] == started
        assert threads[started].startswith(PREFIX)


def test_lookup_timeout_is_every_timeout_error() -> None:
    """API: LookupTimeout is every TimeoutError (builtin, asyncio's, futures'), and it pickles."""
    exc = LookupTimeout(110, "lookup of 'localhost' took longer than 1 s")
    assert isinstance(exc, TimeoutError)
    assert isinstance(exc, asyncio.TimeoutError)
    assert isinstance(exc, cf.TimeoutError)
    assert isinstance(exc, OSError) and exc.errno == 110
    assert isinstance(exc, propagate.PropagateError)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is LookupTimeout and again.args == exc.args


def test_timeout_async(exporter: InMemorySpanExporter) -> None:
    """I4: a timeout raises asyncio.TimeoutError; the lookup goes on; its span ends ERROR, there."""
    slow = SlowLookup()
    raised: list[BaseException] = []
    with released(slow), Resolver(max_workers=1, timeout=0.05, getaddrinfo=slow) as resolver:
        async def body(caller: trace.Span) -> trace.Span:
            with pytest.raises(asyncio.TimeoutError) as info:
                await resolver.getaddrinfo("localhost", 80)
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value, LookupTimeout)
            assert "took longer than 0.05 s" in str(info.value)
            raised.append(info.value)
            return caller

        caller = in_span(body)
        assert lookups(exporter) == []  # still running
        assert resolver.pending == 1
        slow.release.set()
        threads = lookup_threads()
    span = only_lookup(exporter)  # close() waited for it
    assert_child_on_lookup_thread(span, caller, threads)
    assert THREADS.started[span.context.span_id] in slow.threads
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == f"LookupTimeout: {raised[0]}"
    assert span.events == ()  # the lookup itself raised nothing
    assert resolver.pending == 0


def test_timeout_blocking(exporter: InMemorySpanExporter) -> None:
    """I4: resolve() raises cf.TimeoutError on timeout; the span ends ERROR later, on its thread."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=1, timeout=0.05, getaddrinfo=slow) as resolver:
        with propagate.span("caller") as caller, pytest.raises(cf.TimeoutError) as info:
            resolver.resolve("localhost", 80)
        assert isinstance(info.value, TimeoutError)
        assert isinstance(info.value, asyncio.TimeoutError)
        assert lookups(exporter) == []
        slow.release.set()
        threads = lookup_threads()
    span = only_lookup(exporter)
    assert_child_on_lookup_thread(span, caller, threads)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == f"LookupTimeout: {info.value}"
    assert "took longer than 0.05 s" in span.status.description


def test_lookup_failing_after_its_timeout(exporter: InMemorySpanExporter) -> None:
    """API: a lookup failing after its caller timed out says LookupTimeout; its error's an event."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=1, timeout=0.05, getaddrinfo=slow) as resolver:
        with pytest.raises(LookupTimeout) as info:
            resolver.resolve("localhost", "no-such-service")
        slow.release.set()
    span = only_lookup(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == f"LookupTimeout: {info.value}"
    [event] = span.events
    assert event.attributes is not None
    assert str(event.attributes["exception.type"]).endswith("gaierror")


@pytest.mark.parametrize("form", ["async", "blocking"])
def test_answer_as_time_runs_out(form: str, exporter: InMemorySpanExporter,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """API: an answer in before the caller's time is up is the caller's; its span is not ERROR."""
    # Force the tie: the deadline passes after the lookup has answered but before its span
    # ends (and so before its future is done).
    answered, gave_up = threading.Event(), threading.Event()
    verdict = propagate.dns._Verdict
    real_answered, real_too_late = verdict.answered, verdict.too_late

    def answered_then_hold(self: Any) -> Any:
        late = real_answered(self)
        answered.set()
        gave_up.wait(WAIT)
        return late

    def too_late_once_answered(self: Any, late: LookupTimeout) -> bool:
        answered.wait(WAIT)
        try:
            return real_too_late(self, late)
        finally:
            gave_up.set()

    monkeypatch.setattr(verdict, "answered", answered_then_hold)
    monkeypatch.setattr(verdict, "too_late", too_late_once_answered)
    with Resolver(max_workers=1, timeout=0.01) as resolver:
        if form == "async":
            answer = asyncio.run(resolver.getaddrinfo("localhost", 80))
        else:
            answer = resolver.resolve("localhost", 80)
    assert gave_up.is_set()
    assert answer == socket.getaddrinfo("localhost", 80)
    assert only_lookup(exporter).status.status_code is StatusCode.UNSET


def test_lookup_raising_timeout_error_is_not_a_lookup_timeout(
        exporter: InMemorySpanExporter) -> None:
    """I7: a TimeoutError raised by the lookup function itself reaches the caller unchanged."""
    mine = TimeoutError("the lookup function's own")

    def times_out(*question: Any) -> list[Any]:
        raise mine

    with Resolver(max_workers=1, timeout=WAIT, getaddrinfo=times_out) as resolver:
        with pytest.raises(TimeoutError) as in_sync:
            resolver.resolve("localhost", 80)
        with pytest.raises(TimeoutError) as in_async:
            asyncio.run(resolver.getaddrinfo("localhost", 80))
    assert in_sync.value is mine and in_async.value is mine


def test_cancelling_the_caller(exporter: InMemorySpanExporter,
                               caplog: pytest.LogCaptureFixture) -> None:
    """I4: a cancelled caller leaves the lookup running; it ends on its thread, nothing logs."""
    caplog.set_level(logging.DEBUG)
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=1, getaddrinfo=slow) as resolver:
        async def body(caller: trace.Span) -> trace.Span:
            task = asyncio.ensure_future(resolver.getaddrinfo("localhost", "no-such-service"))
            await until(lambda: bool(slow.calls))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            slow.release.set()  # the lookup now fails, with nobody waiting for it
            await until(lambda: resolver.pending == 0)
            await asyncio.sleep(0.01)  # the loop runs the answer's callback, if any
            return caller

        caller = in_span(body)
        threads = lookup_threads()
    gc.collect()  # an unretrieved exception would be logged when its future is collected
    span = only_lookup(exporter)
    assert_child_on_lookup_thread(span, caller, threads)
    assert span.status.status_code is StatusCode.ERROR
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_loop_closed_before_the_answer(exporter: InMemorySpanExporter,
                                       caplog: pytest.LogCaptureFixture) -> None:
    """I4: a lookup outliving its event loop ends its span on its thread, and nothing logs."""
    caplog.set_level(logging.DEBUG)
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=1, getaddrinfo=slow) as resolver:
        async def body(caller: trace.Span) -> trace.Span:
            task = asyncio.ensure_future(resolver.getaddrinfo("localhost", 80))
            await until(lambda: bool(slow.calls))
            assert not task.done()
            return caller  # the task is left running

        caller = in_span(body)  # asyncio.run cancels the task and closes the loop
        slow.release.set()
        threads = lookup_threads()
    assert_child_on_lookup_thread(only_lookup(exporter), caller, threads)
    assert resolver.pending == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# the cap


def test_cap_bounds_running_and_queued_lookups(exporter: InMemorySpanExporter) -> None:
    """I7: with many slow lookups, at most max_pending run or queue; the rest wait their turn."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=2, max_pending=3, getaddrinfo=slow) as resolver:
        slow.watch = resolver
        async def body(caller: trace.Span) -> list[Any]:
            tasks = [asyncio.ensure_future(resolver.getaddrinfo("localhost", 9000 + i))
                     for i in range(20)]
            await until(lambda: len(slow.calls) == 2)
            await asyncio.sleep(0.05)  # every task has had its chance to queue a lookup
            assert resolver.pending == 3
            assert resolver._pool._work_queue.qsize() == 1
            assert len(slow.calls) == 2
            slow.release.set()
            return await asyncio.gather(*tasks)

        answers = in_span(body)
    assert answers == [socket.getaddrinfo("localhost", 9000 + i) for i in range(20)]
    assert sorted(port for _, port in slow.calls) == list(range(9000, 9020))
    assert slow.most_running == 2
    assert max(slow.seen_pending) <= 3
    assert max(slow.seen_held) <= 3
    assert len(lookups(exporter)) == 20


def test_callers_that_give_up_do_not_pile_up_lookups(exporter: InMemorySpanExporter) -> None:
    """I7: callers timing out and retrying leave at most max_pending lookups, not one each."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=2, max_pending=3, timeout=0.05,
                                  getaddrinfo=slow) as resolver:
        async def wave() -> list[BaseException]:
            results = await asyncio.gather(
                *(resolver.getaddrinfo("localhost", 80) for _ in range(20)),
                return_exceptions=True)
            return [r for r in results if isinstance(r, BaseException)]

        for _ in range(3):
            errors = asyncio.run(wave())
            assert len(errors) == 20
            assert all(isinstance(e, LookupTimeout) for e in errors)
            assert resolver.pending == 3
            assert resolver._pool._work_queue.qsize() == 1
        assert any("slots" in str(e) for e in errors)  # most never got a slot
        slow.release.set()
    assert len(slow.calls) == 3  # 60 callers, 3 lookups
    assert len(lookups(exporter)) == 3
    assert resolver.pending == 0


def test_blocking_callers_wait_their_turn(exporter: InMemorySpanExporter) -> None:
    """I7: resolve() with every slot taken blocks until one frees, or until the timeout."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=1, max_pending=1, getaddrinfo=slow) as resolver:
        answers: list[Any] = []
        first = propagate.Thread(target=lambda: answers.append(resolver.resolve("localhost", 1)))
        second = propagate.Thread(target=lambda: answers.append(resolver.resolve("localhost", 2)))
        first.start()
        wait_until(lambda: len(slow.calls) == 1)
        second.start()
        wait_until(lambda: len(resolver._slots._line) == 1)  # in line, not queued
        assert resolver.pending == 1 and len(slow.calls) == 1
        slow.release.set()
        first.join(WAIT)
        second.join(WAIT)
    assert sorted(answers) == sorted([socket.getaddrinfo("localhost", 1),
                                      socket.getaddrinfo("localhost", 2)])

    slow = SlowLookup()
    with released(slow), Resolver(max_workers=1, max_pending=1, timeout=0.05,
                                  getaddrinfo=slow) as resolver:
        with pytest.raises(LookupTimeout, match="took longer"):
            resolver.resolve("localhost", 80)  # times out, and keeps its slot
        with pytest.raises(LookupTimeout, match="1 slots"):
            resolver.resolve("localhost", 80)  # waits for a slot, in vain
        assert len(slow.calls) == 1
        slow.release.set()


def test_cancelled_waiters_leave_the_cap_intact(exporter: InMemorySpanExporter) -> None:
    """I7: callers cancelled while waiting for a slot free none: pending stays exact, not < 0."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=8, max_pending=2, getaddrinfo=slow) as resolver:
        slow.watch = resolver

        async def main() -> list[Any]:
            first = [asyncio.ensure_future(resolver.getaddrinfo("localhost", 9000 + i))
                     for i in range(8)]
            await until(lambda: len(slow.calls) == 2 and len(resolver._slots._line) == 6)
            for task in first[2:]:
                task.cancel()
            gone = await asyncio.gather(*first[2:], return_exceptions=True)
            assert all(isinstance(e, asyncio.CancelledError) for e in gone)
            assert resolver.pending == 2 and not resolver._slots._line
            then = [asyncio.ensure_future(resolver.getaddrinfo("localhost", 9100 + i))
                    for i in range(4)]
            await until(lambda: len(resolver._slots._line) == 4)  # the cap still holds
            assert len(slow.calls) == 2
            slow.release.set()
            return await asyncio.gather(*first[:2], *then)

        answers = asyncio.run(main())
    assert len(answers) == 6 and len(slow.calls) == 6
    assert slow.most_running == 2 and 0 <= min(slow.seen_pending) <= max(slow.seen_pending) <= 2
    assert resolver.pending == 0


@pytest.mark.parametrize("cancel_first", [False, True])
def test_cancelled_as_its_slot_comes(cancel_first: bool) -> None:
    """I7: a waiter cancelled in the loop turn its slot is offered passes the slot on, once."""
    slots = Slots(1)

    async def main() -> None:
        assert slots.take_now()
        waiter = asyncio.ensure_future(slots.take_async(None))
        await until(lambda: len(slots._line) == 1)
        if cancel_first:
            waiter.cancel()
        slots.give()  # offered: the waiter has not run since
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert slots.taken == 0 and slots._free == 1

    asyncio.run(main())


def test_wait_for_retries_keep_the_cap(exporter: InMemorySpanExporter) -> None:
    """I7: callers retrying with asyncio.wait_for never run more than max_pending lookups."""
    slow = SlowLookup()
    with released(slow), Resolver(max_workers=32, max_pending=4, getaddrinfo=slow) as resolver:
        slow.watch = resolver

        async def retry(i: int) -> Any:
            for attempt in range(3):
                try:
                    return await asyncio.wait_for(
                        resolver.getaddrinfo("localhost", 9000 + 10 * i + attempt), 0.02)
                except asyncio.TimeoutError:
                    assert 0 <= resolver.pending <= 4
            return None

        async def main() -> list[Any]:
            given_up = await asyncio.gather(*(retry(i) for i in range(40)))
            assert given_up == [None] * 40
            assert resolver.pending == 4 and len(slow.calls) == 4
            slow.release.set()
            return await asyncio.gather(*(retry(i) for i in range(40, 50)))

        answers = asyncio.run(main())
    assert all(answers)
    assert slow.most_running <= 4 and max(slow.seen_pending) <= 4
    assert resolver.pending == 0


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(fn()), daemon=True)
    thread.start()
    return thread, got


def test_slot_offered_to_a_stopped_loop_goes_on(exporter: InMemorySpanExporter) -> None:
    """I7: a slot offered to a waiter on a stopped loop goes on; the waiter resumes with it."""
    slow = SlowLookup()
    loop = LoopThread()
    with released(slow), Resolver(max_workers=2, max_pending=1, getaddrinfo=slow) as resolver:
        holder, _ = _in_thread(lambda: resolver.resolve("localhost", 1))
        wait_until(lambda: len(slow.calls) == 1)
        stopped = loop.run(resolver.getaddrinfo("localhost", 2))
        wait_until(lambda: len(resolver._slots._line) == 1)
        blocking, answer = _in_thread(lambda: resolver.resolve("localhost", 3))
        wait_until(lambda: len(resolver._slots._line) == 2)
        loop.stop()
        slow.release.set()  # the slot goes to the stopped loop's waiter first, then on
        blocking.join(WAIT)
        assert answer == [socket.getaddrinfo("localhost", 3)]
        wait_until(lambda: resolver.pending == 0)  # its lookup's callback gives the slot back
        assert not stopped.done()
        loop.start()  # the waiter lines up again, and takes the free slot
        assert stopped.result(WAIT) == socket.getaddrinfo("localhost", 2)
        holder.join(WAIT)
    loop.close()
    assert [port for _, port in slow.calls] == [1, 3, 2]


@pytest.mark.parametrize("next_caller", ["reads pending", "thread", "coroutine"])
def test_slot_stranded_on_a_loop_that_stopped_after_the_offer(
        next_caller: str, exporter: InMemorySpanExporter) -> None:
    """I7: a slot offered to a loop that then stops goes on at a read of pending, or a recheck."""
    slow = SlowLookup()
    loop, other = LoopThread(), LoopThread()
    busy, go = threading.Event(), threading.Event()

    def hold_then_stop() -> None:  # the loop is running, but runs nothing else meanwhile
        busy.set()
        go.wait(WAIT)
        loop.loop.stop()  # the offer queued meanwhile is left for the next run

    with released(slow), Resolver(max_workers=2, max_pending=1, getaddrinfo=slow) as resolver:
        resolver._slots.recheck = WAIT * 2 if next_caller == "reads pending" else 0.05
        holder, _ = _in_thread(lambda: resolver.resolve("localhost", 1))
        wait_until(lambda: len(slow.calls) == 1)
        stranded = loop.run(resolver.getaddrinfo("localhost", 2))
        wait_until(lambda: len(resolver._slots._line) == 1)
        if next_caller == "coroutine":
            answer = other.run(resolver.getaddrinfo("localhost", 3))
        else:
            answer = cf.Future()
            _in_thread(lambda: answer.set_result(resolver.resolve("localhost", 3)))
        wait_until(lambda: len(resolver._slots._line) == 2)
        loop.loop.call_soon_threadsafe(hold_then_stop)
        busy.wait(WAIT)
        slow.release.set()
        wait_until(lambda: bool(resolver._slots._offered))  # to the waiter on the running loop
        slow.release.clear()
        go.set()
        loop.thread.join(WAIT)
        if next_caller == "reads pending":
            assert resolver.pending == 1  # reading it passed the slot on
        wait_until(lambda: len(slow.calls) == 2)
        slow.release.set()
        assert answer.result(WAIT) == socket.getaddrinfo("localhost", 3)
        wait_until(lambda: resolver.pending == 0)
        assert not stranded.done()
        holder.join(WAIT)
    for lt in (loop, other):
        lt.close()
    assert resolver._slots._free == 1 and [port for _, port in slow.calls] == [1, 3]


def test_slot_offered_to_a_closed_loop_goes_on(exporter: InMemorySpanExporter) -> None:
    """I7: a slot offered to a waiter on a closed loop goes on; closing the waiter frees no more."""
    slow = SlowLookup()
    loop = LoopThread()
    with released(slow), Resolver(max_workers=2, max_pending=1, getaddrinfo=slow) as resolver:
        holder, _ = _in_thread(lambda: resolver.resolve("localhost", 1))
        wait_until(lambda: len(slow.calls) == 1)
        loop.run(resolver.getaddrinfo("localhost", 2))
        wait_until(lambda: len(resolver._slots._line) == 1)
        loop.stop()
        loop.loop.close()  # its waiter is still in line
        blocking, answer = _in_thread(lambda: resolver.resolve("localhost", 3))
        wait_until(lambda: len(resolver._slots._line) == 2)
        slow.release.set()
        for thread in (holder, blocking):
            thread.join(WAIT)
        assert answer == [socket.getaddrinfo("localhost", 3)]
        wait_until(lambda: resolver.pending == 0)
        loop.close()  # the waiter's coroutine is closed: it held nothing
        assert resolver.pending == 0 and resolver._slots._free == 1
    assert [port for _, port in slow.calls] == [1, 3]
    closed = weakref.ref(loop.loop)
    del loop
    gc.collect()
    assert closed() is None  # nothing of the resolver's keeps a closed loop (I9)


# the cap under random interleavings

NOTHING = object()  # no outcome yet: the caller is still waiting, or gone with its loop


class Caller:
    """One caller of an interleaving: how it asks, on which loop, and what it got."""

    def __init__(self, kind: str, ports: list[int], loop: LoopThread | None,
                 wait_for: float = 0.0) -> None:
        self.kind = kind  # "async", "wait_for" (retries on timeout), "sync"
        self.ports = ports  # one per attempt
        self.loop = loop
        self.wait_for = wait_for
        self.task: asyncio.Task[Any] | None = None
        self.cancelled = False  # the test asked for its cancellation
        self.outcome: Any = NOTHING


class Interleaving:
    """A seeded mix of callers, cancellations, loops stopping and closing, and a resolver close.

    Lookups are the real ``socket.getaddrinfo("localhost", port)`` held at a gate the run
    opens and closes, with a delay per port, counting how many run at once (`SlowLookup`).
    Every random choice is made here, on the test's thread, so a seed replays the same
    script (the threads still interleave as the OS schedules them).
    """

    ACTIONS = ("call",) * 6 + ("cancel", "gate", "stop", "stop", "restart", "restart", "pause",
                               "close_loop", "close_resolver")

    def __init__(self, seed: int) -> None:
        self.rng = rng = random.Random(seed)
        self.cap = rng.randint(1, 4)
        self.lookup = SlowLookup()
        self.resolver = Resolver(max_workers=self.cap + 3, max_pending=self.cap,
                                 timeout=rng.choice((None, None, 0.01, 0.03)),
                                 getaddrinfo=self.lookup)
        self.resolver._slots.recheck = 0.02  # a slot stranded on a stopped loop comes back soon
        self.lookup.watch = self.resolver
        self.loops = [LoopThread() for _ in range(rng.randint(1, 3))]
        self.closed_loops: set[LoopThread] = set()
        self.callers: list[Caller] = []
        self.threads: list[threading.Thread] = []
        self.said: dict[int, Any] = {}  # what each attempt's caller got, by port
        self.resolver_closed = False
        self._ports = iter(range(20000, 60000))

    def run(self, steps: int) -> None:
        for _ in range(steps):
            getattr(self, self.rng.choice(self.ACTIONS))()
            assert 0 <= self.resolver.pending <= self.cap
        self.finish()

    def running_loops(self) -> list[LoopThread]:
        return [lt for lt in self.loops if lt.loop.is_running()]

    def stopped_loops(self) -> list[LoopThread]:
        return [lt for lt in self.loops
                if lt not in self.closed_loops and not lt.loop.is_running()]

    # actions

    def call(self) -> None:
        kinds = ("async", "wait_for", "sync") if self.running_loops() else ("sync",)
        kind = self.rng.choice(kinds)
        attempts = self.rng.randint(1, 3) if kind == "wait_for" else 1
        ports = [next(self._ports) for _ in range(attempts)]
        for port in ports:
            self.lookup.delays[port] = self.rng.choice((0.0, 0.0, 0.002, 0.01))
        loop = self.rng.choice(self.running_loops()) if kind != "sync" else None
        caller = Caller(kind, ports, loop, self.rng.uniform(0.002, 0.03))
        self.callers.append(caller)
        if loop is None:
            thread = threading.Thread(target=self.resolve, args=(caller,), daemon=True)
            thread.start()
            self.threads.append(thread)
        else:
            loop.run(self.ask(caller))

    def cancel(self) -> None:
        waiting = [c for c in self.callers if c.task is not None and c.outcome is NOTHING
                   and c.loop not in self.closed_loops]
        if waiting:
            caller = self.rng.choice(waiting)
            caller.cancelled = True
            assert caller.loop is not None and caller.task is not None
            caller.loop.loop.call_soon_threadsafe(caller.task.cancel)

    def gate(self) -> None:
        if self.lookup.release.is_set():
            self.lookup.release.clear()
        else:
            self.lookup.release.set()

    def stop(self) -> None:
        if self.running_loops():
            self.rng.choice(self.running_loops()).stop()

    def restart(self) -> None:
        if self.stopped_loops():
            self.rng.choice(self.stopped_loops()).start()

    def close_loop(self) -> None:
        open_loops = [lt for lt in self.loops if lt not in self.closed_loops]
        if open_loops and self.rng.random() < 0.3:
            self.close(self.rng.choice(open_loops))

    def close_resolver(self) -> None:
        if self.rng.random() < 0.1:
            self.resolver_closed = True
            self.resolver.close(wait=False)

    def pause(self) -> None:
        time.sleep(self.rng.choice((0.001, 0.005, 0.02)))

    def close(self, lt: LoopThread) -> None:
        self.closed_loops.add(lt)
        lt.close()

    # the callers

    def resolve(self, caller: Caller) -> None:
        try:
            caller.outcome = self.resolver.resolve("localhost", caller.ports[0])
        except Exception as exc:
            caller.outcome = exc
        self.said[caller.ports[0]] = caller.outcome

    async def ask(self, caller: Caller) -> None:
        caller.task = asyncio.current_task()
        for port in caller.ports:
            try:
                self.said[port] = outcome = await self.attempt(caller, port)
            except asyncio.TimeoutError as exc:
                self.said[port] = outcome = exc  # a wait_for caller tries again, on a new port
            except (Exception, asyncio.CancelledError) as exc:  # not GeneratorExit: loop closed
                self.said[port] = outcome = exc
                break
            else:
                break
        caller.outcome = outcome

    def attempt(self, caller: Caller, port: int) -> Awaitable[Any]:
        lookup = self.resolver.getaddrinfo("localhost", port)
        return asyncio.wait_for(lookup, caller.wait_for) if caller.kind == "wait_for" else lookup

    # the end

    def finish(self) -> None:
        """Let everything finish, then check the cap held and every slot came back."""
        self.lookup.release.set()
        stopped = self.stopped_loops()
        for lt in stopped:
            if self.rng.random() < 0.5:
                lt.start()  # its waiters go on; the others stay stopped till the end
        wait_until(lambda: all(c.outcome is not NOTHING for c in self.callers
                               if c.loop is None or c.loop.loop.is_running()))
        self.resolver.close(wait=True)
        for thread in self.threads:
            thread.join(WAIT)
        wait_until(lambda: self.resolver.pending == 0)  # what stopped loops were offered, back
        slots = self.resolver._slots
        assert slots._free == self.cap and not slots._line and not slots._offered
        for lt in self.loops:
            if lt not in self.closed_loops:
                self.close(lt)
        assert slots._free == self.cap  # closing the waiters left behind gave back nothing more
        assert self.lookup.most_running <= self.cap
        assert min(self.lookup.seen_pending, default=0) >= 0
        assert max(self.lookup.seen_pending + self.lookup.seen_held, default=0) <= self.cap

    def expected(self, caller: Caller) -> bool:
        """Whether ``caller.outcome`` is one this caller may get."""
        outcome = caller.outcome
        if outcome is NOTHING:
            return caller.loop in self.closed_loops
        if isinstance(outcome, list):
            [port] = {info[4][1] for info in outcome}
            return port in caller.ports and outcome == socket.getaddrinfo("localhost", port)
        if isinstance(outcome, asyncio.CancelledError):
            return caller.cancelled
        if isinstance(outcome, LookupTimeout):
            return self.resolver.timeout is not None
        if isinstance(outcome, asyncio.TimeoutError):
            return caller.kind == "wait_for"
        return (isinstance(outcome, RuntimeError) and "after close()" in str(outcome)
                and self.resolver_closed)

    def check_spans(self, exporter: InMemorySpanExporter) -> None:
        """One span per lookup, ended on its thread, ERROR exactly when its caller timed out."""
        spans = lookups(exporter)
        assert len(spans) == len(self.lookup.calls)
        for span in spans:
            assert span.attributes is not None
            said = self.said.get(int(str(span.attributes["server.port"])))
            took_too_long = isinstance(said, LookupTimeout) and "took longer" in str(said)
            assert (span.status.status_code is StatusCode.ERROR) == took_too_long, (said, span)
            if took_too_long:
                assert span.status.description == f"LookupTimeout: {said}"
            started = THREADS.started[span.context.span_id]
            assert THREADS.ended[span.context.span_id] == started


@pytest.mark.parametrize("seed", range(48))
def test_cap_holds_under_random_interleavings(seed: int, exporter: InMemorySpanExporter) -> None:
    """I7: whatever callers, cancels, loops and close() do, the cap holds and pending ends at 0."""
    run = Interleaving(seed)
    try:
        run.run(steps=60)
    finally:
        run.lookup.release.set()
        for lt in run.loops:
            if not lt.loop.is_closed():
                run.close(lt)
        run.resolver.close(wait=True)
    unexpected = [(c.kind, c.cancelled, c.outcome) for c in run.callers if not run.expected(c)]
    assert unexpected == []
    run.check_spans(exporter)


# lifetime


def test_close_and_context_manager(exporter: InMemorySpanExporter) -> None:
    """API: close() refuses new lookups, lets running ones finish, and its threads exit."""
    slow = SlowLookup()
    with released(slow):
        with Resolver(max_workers=1, getaddrinfo=slow) as resolver:
            async def body(caller: trace.Span) -> list[Any]:
                task = asyncio.ensure_future(resolver.getaddrinfo("localhost", 80))
                await until(lambda: bool(slow.calls))
                resolver.close(wait=False)
                with pytest.raises(RuntimeError, match="close"):
                    await resolver.getaddrinfo("localhost", 80)
                slow.release.set()
                return await task

            assert in_span(body) == socket.getaddrinfo("localhost", 80)
        with pytest.raises(RuntimeError, match="close"):
            resolver.resolve("localhost", 80)
    assert "closed" in repr(resolver)
    assert not [t for t in resolver._pool._threads if t.is_alive()]


def test_threads_are_named_and_bounded(exporter: InMemorySpanExporter) -> None:
    """API: lookups run on at most max_workers threads named propagate-dns_N."""
    async def main() -> None:
        with Resolver(max_workers=2) as resolver:
            await asyncio.gather(*(resolver.getaddrinfo("localhost", 80) for _ in range(30)))

    asyncio.run(main())
    names = {s.attributes["thread.name"] for s in lookups(exporter) if s.attributes}
    assert 1 <= len(names) <= 2
    assert all(str(name).startswith(PREFIX + "_") for name in names)


@pytest.mark.parametrize("kwargs, error", [
    ({"max_workers": 0}, "max_workers must be greater than 0"),
    ({"max_pending": 0}, "max_pending must be greater than 0"),
    ({"timeout": 0}, "timeout must be None or greater than 0, not 0"),
    ({"timeout": -1.0}, "timeout must be None or greater than 0, not -1.0"),
])
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], error: str) -> None:
    """I7: bad arguments fail when the resolver is made, saying which."""
    with pytest.raises(ValueError, match=error):
        Resolver(**kwargs)


def test_bad_lookup_function_fails_at_construction() -> None:
    """I7: a lookup function that is not callable fails when the resolver is made."""
    with pytest.raises(TypeError, match="getaddrinfo must be callable, not 'localhost'"):
        Resolver(getaddrinfo="localhost")  # type: ignore[arg-type]


# aiohttp


@contextmanager
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


async def serve(sock: socket.socket) -> web.AppRunner:
    """A real aiohttp server on 127.0.0.1, answering GET / with "hello"."""
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def test_aiohttp_request_span(exporter: InMemorySpanExporter) -> None:
    """I1, I4: an aiohttp request to http://localhost puts dns.lookup under the request span."""
    async def main() -> tuple[trace.Span, str, dict[int, str]]:
        with listening() as sock:
            runner = await serve(sock)
            port = sock.getsockname()[1]
            try:
                connector = aiohttp.TCPConnector(resolver=AiohttpResolver())
                async with aiohttp.ClientSession(connector=connector) as session:
                    with propagate.span("GET /") as request_span:
                        async with session.get(f"http://localhost:{port}/") as response:
                            body = await response.text()
                    return request_span, body, lookup_threads()
            finally:
                await runner.cleanup()

    request_span, body, threads = asyncio.run(main())
    assert body == "hello"
    span = only_lookup(exporter)
    assert_child_on_lookup_thread(span, request_span, threads)
    assert span.attributes is not None and span.attributes["dns.question.name"] == "localhost"


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNSPEC, socket.AF_INET6])
def test_aiohttp_resolver_answers_as_threaded_resolver(family: socket.AddressFamily,
                                                       exporter: InMemorySpanExporter) -> None:
    """API: AiohttpResolver answers as aiohttp's ThreadedResolver does, or fails the same way."""
    async def outcome(resolver: Any) -> Any:
        try:
            return await resolver.resolve("localhost", 8080, family=family)
        except OSError as exc:
            return type(exc), exc.args

    async def main() -> tuple[Any, Any]:
        with Resolver(max_workers=1) as ours:
            return (await outcome(AiohttpResolver(ours)), await outcome(ThreadedResolver()))

    mine, theirs = asyncio.run(main())
    assert mine == theirs


def test_aiohttp_resolver_errors(exporter: InMemorySpanExporter) -> None:
    """I7: gaierror passes through; aiohttp reports a LookupTimeout as a connector error."""
    async def main() -> None:
        with pytest.raises(socket.gaierror):
            await AiohttpResolver().resolve("localhost", "no-such-service")  # type: ignore[arg-type]
        slow = SlowLookup()
        with released(slow), Resolver(max_workers=1, timeout=0.05, getaddrinfo=slow) as resolver:
            connector = aiohttp.TCPConnector(resolver=AiohttpResolver(resolver))
            async with aiohttp.ClientSession(connector=connector) as session:
                with pytest.raises(aiohttp.ClientConnectorError) as info:
                    await session.get("http://localhost:9/")
            assert isinstance(info.value.os_error, LookupTimeout)
            slow.release.set()

    asyncio.run(main())


def test_aiohttp_resolver_is_an_abstract_resolver() -> None:
    """API: AiohttpResolver is an aiohttp AbstractResolver; close() leaves its Resolver open."""
    from aiohttp.abc import AbstractResolver

    with Resolver(max_workers=1) as resolver:
        adapter = AiohttpResolver(resolver)
        assert isinstance(adapter, AbstractResolver)
        asyncio.run(adapter.close())
        assert resolver.resolve("localhost", 80)


def test_aiohttp_resolver_without_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    """I7: without aiohttp, reading propagate.dns.AiohttpResolver raises an ImportError
    naming the extra; the rest of propagate.dns works."""
    monkeypatch.delitem(sys.modules, "propagate._aiohttp")
    monkeypatch.setitem(sys.modules, "aiohttp.abc", None)
    with pytest.raises(ImportError, match=r"propagate\[aiohttp\]"):
        propagate.dns.AiohttpResolver  # noqa: B018
    with Resolver(max_workers=1) as resolver:
        assert resolver.resolve("localhost", 80)


def test_aiohttp_resolver_is_read_from_its_own_module() -> None:
    """API: propagate.dns.AiohttpResolver is propagate._aiohttp's, found by name, and listed."""
    from propagate import _aiohttp

    assert propagate.dns.AiohttpResolver is _aiohttp.AiohttpResolver is AiohttpResolver
    assert "AiohttpResolver" in dir(propagate.dns)
    with pytest.raises(AttributeError, match="no_such_name"):
        propagate.dns.no_such_name  # type: ignore[attr-defined]  # noqa: B018
