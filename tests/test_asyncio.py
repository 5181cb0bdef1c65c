"""propagate._asyncio: to_thread, run_in_executor and install, on real event loops."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from tests import asyncio_tasks
from tests.helpers import START_METHODS, assert_ended_where_started, one_span

VAR: ContextVar[str] = ContextVar("tests.test_asyncio.var", default="unset")

INHERITS = bool(getattr(sys.flags, "thread_inherit_context", False))  # 3.14+


def seen(*args: Any, **kwargs: Any) -> tuple[trace.Span, str, tuple[Any, ...], dict[str, Any], str]:
    """What a thread task sees: current span, VAR, its arguments and its thread's name."""
    return trace.get_current_span(), VAR.get(), args, kwargs, threading.current_thread().name


@contextmanager
def warm(pool: cf.ProcessPoolExecutor) -> Iterator[cf.ProcessPoolExecutor]:
    """A one-worker process pool whose worker is already running.

    A worker forked later, from inside the caller's span, would inherit the caller's
    context through fork itself and prove nothing.
    """
    with pool:
        pool.submit(os.getpid).result(timeout=60)
        yield pool


def run_in_caller_span(body: Callable[[trace.Span], Awaitable[Any]]) -> Any:
    """asyncio.run ``body(caller_span)`` with VAR set and a caller span current."""
    async def main() -> Any:
        VAR.set("caller")
        with trace.get_tracer("tests").start_as_current_span("caller") as caller:
            return await body(caller)

    return asyncio.run(main())


# to_thread


def test_to_thread_runs_in_callers_context(exporter: InMemorySpanExporter) -> None:
    """I1: to_thread runs fn with the caller's span and ContextVars, passing keyword arguments."""
    async def body(caller: trace.Span) -> None:
        span, var, args, kwargs, _ = await propagate.to_thread(seen, 1, 2, key="value")
        assert span is caller
        assert var == "caller"
        assert (args, kwargs) == ((1, 2), {"key": "value"})

    run_in_caller_span(body)
    assert_ended_where_started()


@pytest.mark.parametrize("make", [cf.ThreadPoolExecutor, propagate.ThreadPoolExecutor],
                         ids=["stdlib", "propagate"])
def test_to_thread_with_thread_pool(make: Callable[..., cf.ThreadPoolExecutor],
                                    exporter: InMemorySpanExporter) -> None:
    """I1: to_thread(executor=a thread pool) runs there, in the caller's context."""
    async def body(caller: trace.Span) -> None:
        with make(max_workers=1, thread_name_prefix="given") as pool:
            span, var, args, kwargs, name = await propagate.to_thread(
                seen, "a", executor=pool, key=1)
        assert span is caller
        assert var == "caller"
        assert (args, kwargs) == (("a",), {"key": 1})
        assert name.startswith("given")

    run_in_caller_span(body)
    assert_ended_where_started()


@pytest.mark.parametrize("make", [cf.ProcessPoolExecutor, propagate.ProcessPoolExecutor],
                         ids=["stdlib", "propagate"])
def test_to_thread_with_process_pool(make: Callable[..., cf.ProcessPoolExecutor],
                                     mp_context: Any, exporter: InMemorySpanExporter) -> None:
    """I1: to_thread(executor=a process pool) carries registered vars and trace parentage."""
    async def body(caller: trace.Span) -> tuple[Any, ...]:
        asyncio_tasks.REQUEST_ID.set("req-1")
        return (caller.get_span_context(),
                await propagate.to_thread(asyncio_tasks.observe, "t", executor=pool, suffix="!"))

    with warm(make(max_workers=1, mp_context=mp_context)) as pool:
        caller, (request_id, trace_id, span_id, tag, pid) = run_in_caller_span(body)
    assert request_id == "req-1"
    assert (trace_id, span_id) == (caller.trace_id, caller.span_id)
    assert tag == "t!"
    assert pid != os.getpid()
    # the worker's span came home with the caller's span as parent
    in_worker = one_span(exporter, "in-worker")
    assert in_worker.parent is not None and in_worker.parent.span_id == caller.span_id


def test_to_thread_changes_do_not_flow_back(exporter: InMemorySpanExporter) -> None:
    """I2: ContextVar changes and spans made in fn do not reach the caller."""
    def change() -> None:
        VAR.set("changed in fn")
        span = trace.get_tracer("tests").start_span("leak?")
        otel_context.attach(trace.set_span_in_context(span))  # left attached in fn's snapshot
        span.end()

    async def body(caller: trace.Span) -> None:
        await propagate.to_thread(change)
        assert VAR.get() == "caller"
        assert trace.get_current_span() is caller
        await propagate.run_in_executor(None, change)
        assert VAR.get() == "caller"
        assert trace.get_current_span() is caller

    run_in_caller_span(body)


# run_in_executor


def test_run_in_executor_keywords_and_default_executor(exporter: InMemorySpanExporter) -> None:
    """I1: run_in_executor(None, ...) uses the default executor, with keywords and the context."""
    async def body(caller: trace.Span) -> None:
        default = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="the-default")
        asyncio.get_running_loop().set_default_executor(default)
        span, var, args, kwargs, name = await propagate.run_in_executor(None, seen, 1, key=2)
        assert span is caller
        assert var == "caller"
        assert (args, kwargs) == ((1,), {"key": 2})
        assert name.startswith("the-default")

    run_in_caller_span(body)
    assert_ended_where_started()


@pytest.mark.parametrize("make", [cf.ThreadPoolExecutor, propagate.ThreadPoolExecutor],
                         ids=["stdlib", "propagate"])
def test_run_in_executor_thread_pool(make: Callable[..., cf.ThreadPoolExecutor],
                                     exporter: InMemorySpanExporter) -> None:
    """I1: run_in_executor(a thread pool, ...) runs fn there in the caller's context."""
    async def body(caller: trace.Span) -> None:
        with make(max_workers=1, thread_name_prefix="given") as pool:
            span, var, args, kwargs, name = await propagate.run_in_executor(pool, seen, key=3)
        assert (span, var, args, kwargs) == (caller, "caller", (), {"key": 3})
        assert name.startswith("given")

    run_in_caller_span(body)


def test_run_in_executor_stdlib_process_pool(exporter: InMemorySpanExporter) -> None:
    """I1: run_in_executor(a stdlib process pool, ...) carries the registered var and parentage."""
    async def body(caller: trace.Span) -> tuple[Any, ...]:
        asyncio_tasks.REQUEST_ID.set("req-2")
        plain = await asyncio.get_running_loop().run_in_executor(pool, asyncio_tasks.observe, "p")
        assert plain[:3] == (None, 0, 0)  # baseline: the stdlib carries nothing
        return (caller.get_span_context(),
                await propagate.run_in_executor(pool, asyncio_tasks.observe, "p"))

    with warm(cf.ProcessPoolExecutor(max_workers=1)) as pool:
        caller, (request_id, trace_id, span_id, tag, _) = run_in_caller_span(body)
    assert (request_id, tag) == ("req-2", "p")
    assert (trace_id, span_id) == (caller.trace_id, caller.span_id)


def test_run_in_executor_exception_unchanged(exporter: InMemorySpanExporter) -> None:
    """I7: the exception fn raises reaches the caller unchanged (threads: the same object)."""
    raised: list[BaseException] = []

    def fail() -> None:
        exc = KeyError("thread")
        raised.append(exc)
        raise exc

    async def body(caller: trace.Span) -> None:
        with pytest.raises(KeyError) as info:
            await propagate.run_in_executor(None, fail)
        assert info.value is raised[0]
        with pytest.raises(LookupError) as remote:
            await propagate.run_in_executor(pool, asyncio_tasks.fail, "process")
        assert type(remote.value) is LookupError
        assert remote.value.args == ("process", 42)
        assert "asyncio_tasks.py" in str(remote.value.__cause__)  # the remote traceback

    with warm(cf.ProcessPoolExecutor(max_workers=1)) as pool:
        run_in_caller_span(body)


Call = Callable[[cf.Executor, Callable[[], None]], Awaitable[None]]


async def cancel_running_and_queued(call: Call) -> tuple[list[str], list[str]]:
    """Cancel a task awaiting a running call and one awaiting a queued call; say what happened."""
    loop = asyncio.get_running_loop()
    started = asyncio.Event()
    release = threading.Event()
    ran: list[str] = []

    def blocker() -> None:
        loop.call_soon_threadsafe(started.set)
        release.wait(timeout=10)
        ran.append("blocker")

    def queued() -> None:
        ran.append("queued")

    async def awaiting(fn: Callable[[], None]) -> None:
        await call(pool, fn)

    outcomes = []
    with cf.ThreadPoolExecutor(max_workers=1) as pool:
        running = asyncio.ensure_future(awaiting(blocker))
        await asyncio.wait_for(started.wait(), timeout=10)
        waiting = asyncio.ensure_future(awaiting(queued))
        await asyncio.sleep(0)  # let it submit
        running.cancel()
        waiting.cancel()
        for task in (running, waiting):
            try:
                await task
                outcomes.append("done")
            except asyncio.CancelledError:
                outcomes.append("cancelled")
        release.set()
    return outcomes, ran


def test_run_in_executor_cancellation_like_stdlib() -> None:
    """API: cancelling the awaiting task behaves as loop.run_in_executor: queued work never
    runs."""
    def stdlib(pool: cf.Executor, fn: Callable[[], None]) -> Awaitable[None]:
        return asyncio.get_running_loop().run_in_executor(pool, fn)

    expected = (["cancelled", "cancelled"], ["blocker"])
    assert asyncio.run(cancel_running_and_queued(stdlib)) == expected
    assert asyncio.run(cancel_running_and_queued(propagate.run_in_executor)) == expected


# install


def test_install_returns_idempotent_propagate_pool() -> None:
    """API: install() makes a propagate.ThreadPoolExecutor the default executor, once."""
    async def main() -> None:
        first = propagate.install()
        assert isinstance(first, propagate.ThreadPoolExecutor)
        assert propagate.install() is first
        assert propagate.install(asyncio.get_running_loop()) is first

    asyncio.run(main())


def test_stdlib_default_executor_loses_context() -> None:
    """I1: the baseline: without install(), loop.run_in_executor(None, ...) loses the span
    and ContextVar.

    Under 3.14's thread_inherit_context the worker thread starts in a copy of the context
    of the call that created it, and keeps it: every later task sees that first caller's
    values, whoever submits it (stale context, which propagate never gives).
    """
    async def body(caller: trace.Span) -> None:
        loop = asyncio.get_running_loop()
        span, var, *_ = await loop.run_in_executor(None, seen)
        VAR.set("second caller")
        with trace.get_tracer("tests").start_as_current_span("second"):
            later, later_var, *_ = await loop.run_in_executor(None, seen)
        if INHERITS:
            assert (span, var) == (later, later_var) == (caller, "caller")
        else:
            assert not span.get_span_context().is_valid and var == "unset"
            assert not later.get_span_context().is_valid and later_var == "unset"

    run_in_caller_span(body)


def test_install_default_executor_carries_context(exporter: InMemorySpanExporter) -> None:
    """I1: after install(), plain loop.run_in_executor(None, fn) runs fn in the caller's context."""
    async def body(caller: trace.Span) -> None:
        propagate.install()
        span, var, args, _, _ = await asyncio.get_running_loop().run_in_executor(None, seen, 7)
        assert (span, var, args) == (caller, "caller", (7,))

    run_in_caller_span(body)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, trace.Span]]:
    """socket.getaddrinfo, still real, recording the host and current span of each call."""
    real = socket.getaddrinfo
    calls: list[tuple[object, trace.Span]] = []

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append((host, trace.get_current_span()))
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return calls


@pytest.mark.parametrize("installed", [False, True], ids=["stdlib", "installed"])
def test_install_getaddrinfo_sees_callers_span(installed: bool,
                                               lookups: list[tuple[object, trace.Span]]) -> None:
    """I1: after install(), loop.getaddrinfo's blocking lookup runs in the caller's context."""
    async def body(caller: trace.Span) -> None:
        if installed:
            propagate.install()
        infos = await asyncio.get_running_loop().getaddrinfo("localhost", 80)
        assert infos  # the real lookup happened
        [(host, span)] = lookups
        assert host == "localhost"
        if installed or INHERITS:  # under the flag the new worker inherited it (see above)
            assert span is caller
        else:  # the stdlib loses it: the reason install() exists
            assert not span.get_span_context().is_valid

    run_in_caller_span(body)


def test_install_replaces_existing_default_executor() -> None:
    """I1, API: install() after the loop made a stdlib default executor shuts that one down,
    and tasks then run in the caller's context."""
    async def body(caller: trace.Span) -> None:
        loop = asyncio.get_running_loop()
        old_thread = await loop.run_in_executor(None, threading.current_thread)
        installed = propagate.install()
        span, var, _, _, _ = await loop.run_in_executor(None, seen)
        new_thread = await loop.run_in_executor(None, threading.current_thread)
        assert (span, var) == (caller, "caller")
        assert new_thread is not old_thread
        assert propagate.install() is installed
        old_thread.join(timeout=10)
        assert not old_thread.is_alive()

    run_in_caller_span(body)


def test_asyncio_run_shuts_installed_executor_down() -> None:
    """I9: asyncio.run shuts the installed executor down: its threads are gone when it returns."""
    async def main() -> tuple[propagate.ThreadPoolExecutor, threading.Thread]:
        executor = propagate.install()
        thread = await asyncio.get_running_loop().run_in_executor(None, threading.current_thread)
        return executor, thread

    executor, thread = asyncio.run(main())
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        executor.submit(print)


# a ContextVar alone


def test_contextvar_only_no_span() -> None:
    """I1: with no span current, a plain ContextVar still crosses every asyncio path."""
    async def main() -> None:
        VAR.set("only a var")
        propagate.install()
        loop = asyncio.get_running_loop()
        for call in (propagate.to_thread(seen), propagate.run_in_executor(None, seen),
                     loop.run_in_executor(None, seen)):
            span, var, *_ = await call
            assert var == "only a var"
            assert not span.get_span_context().is_valid

    asyncio.run(main())


NO_PROVIDER = textwrap.dedent("""
    import asyncio, contextvars, propagate
    VAR = contextvars.ContextVar("v", default="unset")

    async def main():
        VAR.set("set")
        with propagate.span("no provider"):
            propagate.install()
            loop = asyncio.get_running_loop()
            got = [await propagate.to_thread(VAR.get),
                   await propagate.run_in_executor(None, VAR.get),
                   await loop.run_in_executor(None, VAR.get)]
            await loop.getaddrinfo("localhost", 80)
        print(got)

    asyncio.run(main())
""")


def test_no_tracer_provider() -> None:
    """I8: with no tracer provider, the asyncio paths carry ContextVars and log nothing."""
    done = subprocess.run([sys.executable, "-W", "error", "-c", NO_PROVIDER],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['set', 'set', 'set']"
    assert done.stderr == ""


def test_run_in_executor_task_span_named_after_fn(exporter: InMemorySpanExporter) -> None:
    """I4: task_spans through run_in_executor: the span is named after fn, not a wrapper."""
    async def main() -> None:
        with propagate.ThreadPoolExecutor(1, task_spans=True) as pool:
            await propagate.run_in_executor(pool, asyncio_tasks.observe, "x", suffix="!")

    asyncio.run(main())
    assert "observe" in [s.name for s in exporter.get_finished_spans()]


def test_run_in_executor_stdlib_fork_pool_inherits_nothing() -> None:
    """I2: a stdlib fork pool whose worker is forked by run_in_executor inherits no stale var."""
    if "fork" not in START_METHODS:
        pytest.skip("no fork start method here")
    import multiprocessing

    async def main() -> str:
        asyncio_tasks.UNREGISTERED.set("the caller's")
        with cf.ProcessPoolExecutor(1, multiprocessing.get_context("fork")) as pool:
            return await propagate.run_in_executor(pool, asyncio_tasks.unregistered)

    assert asyncio.run(main()) == "default"


def test_to_thread_on_an_installed_default_executor_takes_one_snapshot() -> None:
    """I1: after install(), to_thread and run_in_executor capture once: the executor binds."""
    async def main() -> tuple[int, int]:
        propagate.install()
        with propagate.debug.jitter(0, probability=0.0, max_delay=0.0) as hook:
            VAR.set("once")
            assert await propagate.to_thread(VAR.get) == "once"
            to_thread = hook.counts["capture"]
            assert await propagate.run_in_executor(None, VAR.get) == "once"
        return to_thread, hook.counts["capture"] - to_thread

    assert asyncio.run(main()) == (1, 1)
