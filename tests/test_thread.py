"""propagate/_thread.py: ThreadPoolExecutor, Thread, Timer and wrap, with the real SDK."""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context

import propagate
from tests.helpers import THREADS, assert_freed, current_ids, one_span, spans_named

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("test_thread.request")
WAIT = 10  # seconds: every wait in this file is bounded


def in_fresh_context(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a copy of the current context, so ContextVars it sets stay there."""
    return contextvars.copy_context().run(fn)


@pytest.fixture
def pool() -> Iterator[propagate.ThreadPoolExecutor]:
    with propagate.ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


@pytest.fixture
def one_worker() -> Iterator[propagate.ThreadPoolExecutor]:
    with propagate.ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def block(executor: cf.Executor) -> tuple[threading.Event, cf.Future[None]]:
    """Occupy a one-worker pool until the returned event is set, so later tasks queue."""
    release, running = threading.Event(), threading.Event()

    def blocker() -> None:
        running.set()
        assert release.wait(WAIT)

    future = executor.submit(blocker)
    assert running.wait(WAIT)
    return release, future


# I1: what crosses


def test_task_span_is_child_of_submitters_span(pool, exporter, tracer):
    """I1: a span started in a task is a child of the submitter's span, in the same trace."""
    def task() -> None:
        with tracer.start_as_current_span("in-task"):
            pass

    with tracer.start_as_current_span("submitter") as parent:
        seen = pool.submit(current_ids).result(timeout=WAIT)
        pool.submit(task).result(timeout=WAIT)

    ctx = parent.get_span_context()
    assert seen == (ctx.trace_id, ctx.span_id)
    child = one_span(exporter, "in-task")
    assert child.parent is not None
    assert child.parent.span_id == ctx.span_id
    assert child.context.trace_id == ctx.trace_id


def test_plain_contextvar_crosses(pool):
    """I1: an unregistered ContextVar set by the submitter is seen by the task."""
    def body() -> str:
        REQUEST.set("request-1")
        return pool.submit(REQUEST.get).result(timeout=WAIT)

    assert in_fresh_context(body) == "request-1"


def test_baggage_crosses(pool):
    """I1: the submitter's baggage is the task's baggage."""
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        seen = pool.submit(baggage.get_all).result(timeout=WAIT)
    finally:
        otel_context.detach(token)
    assert dict(seen) == {"tenant": "acme"}


def test_context_is_taken_at_submit_time(one_worker):
    """I1: the task sees the context as it was at submit, not as it is when the task runs."""
    def body() -> str:
        release, _ = block(one_worker)
        REQUEST.set("at-submit")
        future = one_worker.submit(REQUEST.get)
        REQUEST.set("after-submit")
        release.set()
        return future.result(timeout=WAIT)

    assert in_fresh_context(body) == "at-submit"


# I2: nothing leaks


def test_task_changes_do_not_reach_submitter(pool):
    """I2: a ContextVar a task sets is invisible to the submitter."""
    def body() -> str:
        REQUEST.set("submitter")
        pool.submit(REQUEST.set, "task").result(timeout=WAIT)
        return REQUEST.get()

    assert in_fresh_context(body) == "submitter"


def test_task_changes_do_not_reach_next_task(one_worker):
    """I2: changes made in a task do not leak to the next task on the same worker."""
    one_worker.submit(REQUEST.set, "first task").result(timeout=WAIT)
    assert one_worker.submit(REQUEST.get, "unset").result(timeout=WAIT) == "unset"


def test_task_span_does_not_reach_next_task(one_worker, tracer):
    """I2: a span a task leaves current is not the next task's current span."""
    def leave_span_current() -> None:
        otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(
            trace.SpanContext(1, 2, is_remote=False))))  # no detach, on purpose

    one_worker.submit(leave_span_current).result(timeout=WAIT)
    assert one_worker.submit(current_ids).result(timeout=WAIT) == (0, 0)


def test_worker_thread_context_unchanged():
    """I2: the worker thread's own context is unchanged after tasks that set ContextVars."""
    def mark_worker() -> None:
        REQUEST.set("worker's own")

    with propagate.ThreadPoolExecutor(max_workers=1, initializer=mark_worker) as executor:
        def body() -> None:
            REQUEST.set("submitter")
            executor.submit(REQUEST.set, "task").result(timeout=WAIT)

        in_fresh_context(body)
        # The stdlib submit runs in the worker thread's own context, not in a snapshot.
        own = cf.ThreadPoolExecutor.submit(executor, REQUEST.get, "unset")
        assert own.result(timeout=WAIT) == "worker's own"


def test_reused_worker_runs_next_submitters_context(one_worker):
    """I2: a worker created under request A runs a task submitted under request B in B's context."""
    def under(request: str) -> str:
        REQUEST.set(request)
        return one_worker.submit(REQUEST.get).result(timeout=WAIT)

    assert contextvars.copy_context().run(under, "A") == "A"
    assert contextvars.copy_context().run(under, "B") == "B"
    assert one_worker.submit(REQUEST.get, "none").result(timeout=WAIT) == "none"


# I3: fire-and-forget


def test_submitter_span_ends_before_task_runs(one_worker, exporter, tracer):
    """I3: the submitter's span may end before the task runs; the task's spans keep it as parent."""
    def task() -> list[str]:
        ended = [s.name for s in exporter.get_finished_spans()]
        with tracer.start_as_current_span("late-child"):
            pass
        return ended

    release, _ = block(one_worker)
    with tracer.start_as_current_span("short-lived") as parent:
        future = one_worker.submit(task)
    assert not future.done()
    release.set()

    assert "short-lived" in future.result(timeout=WAIT)
    child = one_span(exporter, "late-child")
    assert child.parent is not None
    assert child.parent.span_id == parent.get_span_context().span_id
    assert child.context.trace_id == parent.get_span_context().trace_id


# I5: no references held


class Payload:
    """A value that can be weakly referenced."""


def test_no_reference_to_submitted_context_after_task(pool):
    """I5: a value set in the submitted context is freed once the task has finished."""
    def submit_with_value() -> tuple[weakref.ref[Payload], cf.Future[None]]:
        value = Payload()
        REQUEST.set(value)  # type: ignore[arg-type]
        return weakref.ref(value), pool.submit(REQUEST.get)

    ref, future = contextvars.copy_context().run(submit_with_value)
    assert isinstance(future.result(timeout=WAIT), Payload)
    del future  # the future holds the result, which is the value itself
    assert_freed(ref, WAIT)


# The stdlib shape: map, nesting, errors, cancellation, constructor


def test_map_keeps_order_and_context(pool):
    """I1: map returns results in input order, each computed in the submitter's context."""
    def tag(i: int) -> str:
        time.sleep(0.001 * (5 - i))
        return f"{REQUEST.get()}-{i}"

    def body() -> list[str]:
        REQUEST.set("mapped")
        return list(pool.map(tag, range(6), timeout=WAIT))

    assert in_fresh_context(body) == [f"mapped-{i}" for i in range(6)]


def test_nested_pools_keep_parentage(exporter, tracer):
    """I1: a task that submits to another propagate pool passes its own span on as parent."""
    def inner() -> None:
        with tracer.start_as_current_span("inner"):
            pass

    outer_pool, inner_pool = propagate.ThreadPoolExecutor(1), propagate.ThreadPoolExecutor(1)

    def outer() -> None:
        with tracer.start_as_current_span("middle"):
            inner_pool.submit(inner).result(timeout=WAIT)

    with outer_pool, inner_pool, tracer.start_as_current_span("top") as top:
        outer_pool.submit(outer).result(timeout=WAIT)

    middle, inner_span = one_span(exporter, "middle"), one_span(exporter, "inner")
    assert middle.parent.span_id == top.get_span_context().span_id
    assert inner_span.parent.span_id == middle.context.span_id
    assert inner_span.context.trace_id == top.get_span_context().trace_id


class TaskError(Exception):
    """Raised by a task."""


def test_exception_reaches_caller_unchanged(pool):
    """I7: the task's exception object reaches the caller unchanged, as with the stdlib."""
    raised: list[BaseException] = []

    def fail() -> None:
        exc = TaskError("boom")
        raised.append(exc)
        raise exc

    future = pool.submit(fail)
    with pytest.raises(TaskError) as info:
        future.result(timeout=WAIT)
    assert info.value is raised[0]
    assert future.exception(timeout=WAIT) is raised[0]
    assert "fail" in [frame.name for frame in _frames(info.value)]


def test_exception_in_map_reaches_caller(pool):
    """I7: an exception raised in a mapped task is raised by the map iterator, as in the stdlib."""
    def maybe_fail(i: int) -> int:
        if i == 2:
            raise TaskError(i)
        return i

    results = pool.map(maybe_fail, range(4), timeout=WAIT)
    assert next(results) == 0
    assert next(results) == 1
    with pytest.raises(TaskError):
        next(results)


def _frames(exc: BaseException) -> list[Any]:
    import traceback

    return list(traceback.extract_tb(exc.__traceback__))


def test_cancel_queued_future(one_worker):
    """API: a queued future can be cancelled and its task never runs."""
    ran = threading.Event()
    release, _ = block(one_worker)
    queued = one_worker.submit(ran.set)
    assert queued.cancel()
    release.set()
    one_worker.submit(int).result(timeout=WAIT)
    assert queued.cancelled()
    with pytest.raises(cf.CancelledError):
        queued.result(timeout=WAIT)
    assert not ran.is_set()


def test_shutdown_cancel_futures():
    """API: shutdown(cancel_futures=True) cancels queued tasks, not the running one."""
    executor = propagate.ThreadPoolExecutor(max_workers=1)
    ran: list[int] = []
    release, running = block(executor)
    queued = [executor.submit(ran.append, i) for i in range(3)]
    executor.shutdown(wait=False, cancel_futures=True)
    release.set()
    executor.shutdown(wait=True)
    assert running.result(timeout=WAIT) is None
    assert all(f.cancelled() for f in queued)
    assert ran == []
    with pytest.raises(RuntimeError):
        executor.submit(int)


def test_constructor_parameters_take_effect():
    """API: max_workers, thread_name_prefix, initializer and initargs take effect."""
    started: list[str] = []

    def init(tag: str) -> None:
        started.append(tag)

    with propagate.ThreadPoolExecutor(1, "prefixed", init, ("ok",)) as executor:
        name = executor.submit(lambda: threading.current_thread().name).result(timeout=WAIT)
        assert executor._max_workers == 1
    assert name.startswith("prefixed")
    assert started == ["ok"]
    with pytest.raises(ValueError):
        propagate.ThreadPoolExecutor(max_workers=0)


# task_spans and link


def test_task_spans(exporter, tracer):
    """I4: a task span is named after the callable and started and ended on the worker."""
    def work() -> tuple[int, int, str]:
        thread = threading.current_thread()
        return threading.get_ident(), threading.get_native_id(), thread.name

    executor = propagate.ThreadPoolExecutor(1, task_spans=True)
    with executor, tracer.start_as_current_span("submitter") as parent:
        ident, native_id, thread_name = executor.submit(work).result(timeout=WAIT)

    task = one_span(exporter, work.__qualname__)
    assert THREADS.started[task.context.span_id] == ident
    assert THREADS.ended[task.context.span_id] == ident
    assert ident != threading.get_ident()
    assert task.parent.span_id == parent.get_span_context().span_id
    assert task.context.trace_id == parent.get_span_context().trace_id
    assert task.attributes["thread.id"] == native_id
    assert task.attributes["thread.name"] == thread_name
    assert task.attributes["propagate.queue_seconds"] >= 0


def test_task_spans_one_per_task_and_current_in_task(exporter, tracer):
    """I1: each task gets its own task span, and it is the current span inside the task."""
    def work(i: int) -> int:
        return trace.get_current_span().get_span_context().span_id

    executor = propagate.ThreadPoolExecutor(2, task_spans=True)
    with executor, tracer.start_as_current_span("submitter"):
        seen = list(executor.map(work, range(4), timeout=WAIT))

    spans = spans_named(exporter, work.__qualname__)
    assert sorted(s.context.span_id for s in spans) == sorted(seen)
    assert len(set(seen)) == 4


def test_link_starts_new_trace(exporter, tracer):
    """I1: with link=True the task span is a new trace's root, linked to the submitter's span."""
    def work() -> None:
        pass

    executor = propagate.ThreadPoolExecutor(1, task_spans=True, link=True)
    with executor, tracer.start_as_current_span("submitter") as parent:
        executor.submit(work).result(timeout=WAIT)

    task = one_span(exporter, work.__qualname__)
    submitter = parent.get_span_context()
    assert task.parent is None
    assert task.context.trace_id != submitter.trace_id
    assert len(task.links) == 1
    assert task.links[0].context.trace_id == submitter.trace_id
    assert task.links[0].context.span_id == submitter.span_id


# Thread and Timer


def test_thread_runs_in_context_of_start_not_constructor():
    """I1: propagate.Thread runs in a copy of the context calling start(), not the constructor's."""
    seen: list[str] = []

    def body() -> None:
        REQUEST.set("constructor")
        thread = propagate.Thread(target=lambda: seen.append(REQUEST.get()))
        REQUEST.set("start")
        thread.start()
        thread.join(WAIT)

    in_fresh_context(body)
    assert seen == ["start"]


def test_thread_carries_span(exporter, tracer):
    """I1: a span started in a propagate.Thread is a child of the starter's span."""
    def work() -> None:
        with tracer.start_as_current_span("in-thread"):
            pass

    with tracer.start_as_current_span("starter") as parent:
        thread = propagate.Thread(target=work)
        thread.start()
    thread.join(WAIT)
    assert one_span(exporter, "in-thread").parent.span_id == parent.get_span_context().span_id


def test_thread_subclass_overriding_run():
    """I1: a subclass of propagate.Thread that overrides run() runs in the starter's context."""
    class Worker(propagate.Thread):
        def run(self) -> None:
            self.seen = REQUEST.get()

    def body() -> str:
        REQUEST.set("subclass")
        worker = Worker()
        worker.start()
        worker.join(WAIT)
        return worker.seen

    assert in_fresh_context(body) == "subclass"


def test_thread_changes_do_not_flow_back():
    """I2: ContextVars a propagate.Thread sets are invisible to the starter."""
    def body() -> str:
        REQUEST.set("starter")
        thread = propagate.Thread(target=REQUEST.set, args=("thread",))
        thread.start()
        thread.join(WAIT)
        return REQUEST.get()

    assert in_fresh_context(body) == "starter"


def test_thread_start_twice_after_finish():
    """API: starting a finished Thread again raises RuntimeError; join still works."""
    thread = propagate.Thread(target=int)
    thread.start()
    thread.join(WAIT)
    with pytest.raises(RuntimeError):
        thread.start()
    thread.join(WAIT)
    assert not thread.is_alive()


def test_thread_start_twice_while_running():
    """API: starting a running Thread again raises RuntimeError; it still ends cleanly."""
    release = threading.Event()
    seen: list[str] = []
    errors: list[Any] = []
    threads: list[threading.Thread] = []
    previous_hook = threading.excepthook

    def hook(args: Any) -> None:
        (errors.append if args.thread in threads else previous_hook)(args)

    threading.excepthook = hook

    def work() -> None:
        assert release.wait(WAIT)
        seen.append(REQUEST.get("unset"))

    def body() -> None:
        REQUEST.set("first start")
        thread = propagate.Thread(target=work)
        threads.append(thread)
        thread.start()
        with pytest.raises(RuntimeError):
            thread.start()
        release.set()
        thread.join(WAIT)
        assert not thread.is_alive()

    try:
        in_fresh_context(body)
    finally:
        threading.excepthook = previous_hook
    assert seen == ["first start"]
    assert [(e.exc_type, str(e.exc_value)) for e in errors] == []


def test_timer_runs_in_context_of_start():
    """I1: propagate.Timer runs its function in a copy of the context that calls start()."""
    seen: list[str] = []

    def body() -> None:
        REQUEST.set("constructor")
        timer = propagate.Timer(0.0, lambda: seen.append(REQUEST.get()))
        REQUEST.set("start")
        timer.start()
        timer.join(WAIT)
        REQUEST.set("after start")

    in_fresh_context(body)
    assert seen == ["start"]


def test_timer_is_a_threading_timer_and_cancels():
    """API: propagate.Timer is a threading.Timer and cancel() still stops it."""
    ran = threading.Event()
    timer = propagate.Timer(WAIT, ran.set)
    assert isinstance(timer, threading.Timer)
    timer.start()
    timer.cancel()
    timer.join(WAIT)
    assert not timer.is_alive()
    assert not ran.is_set()


# wrap


def test_wrap_runs_in_snapshot_taken_at_wrap_time():
    """I1: a wrapped function runs in the context as it was when wrap() was called."""
    def body() -> str:
        REQUEST.set("wrap time")
        wrapped = propagate.wrap(REQUEST.get)
        REQUEST.set("call time")
        return wrapped()

    assert in_fresh_context(body) == "wrap time"


def test_wrap_carries_span_to_another_thread(tracer):
    """I1: a function wrapped under a span sees that span as current on another thread."""
    with tracer.start_as_current_span("wrapper") as parent:
        wrapped = propagate.wrap(current_ids)
    seen: list[tuple[int, int]] = []
    thread = threading.Thread(target=lambda: seen.append(wrapped()))
    thread.start()
    thread.join(WAIT)
    ctx = parent.get_span_context()
    assert seen == [(ctx.trace_id, ctx.span_id)]


def test_wrap_concurrent_calls_get_fresh_copies():
    """I2: concurrent calls of one wrapped function each run in their own copy: no cross-talk."""
    workers = 4
    barrier = threading.Barrier(workers, timeout=WAIT)

    def own_value(i: int) -> tuple[str, str]:
        before = REQUEST.get()
        REQUEST.set(f"call {i}")
        barrier.wait()  # every call is inside the snapshot at once
        return before, REQUEST.get()

    def body() -> Callable[[int], tuple[str, str]]:
        REQUEST.set("wrapped")
        return propagate.wrap(own_value)

    wrapped = in_fresh_context(body)
    with cf.ThreadPoolExecutor(workers) as executor:
        results = list(executor.map(wrapped, range(workers), timeout=WAIT))
    assert results == [("wrapped", f"call {i}") for i in range(workers)]


def test_wrap_calls_do_not_see_each_others_changes():
    """I2: a change made by one call of a wrapped function is invisible to the next call."""
    def set_and_get(value: str) -> str:
        before = REQUEST.get("unset")
        REQUEST.set(value)
        return before

    wrapped = propagate.wrap(set_and_get)
    assert wrapped("first") == "unset"
    assert wrapped("second") == "unset"
    assert REQUEST.get("unset") == "unset"


def test_wrap_keeps_function_metadata():
    """API: the wrapper looks like the wrapped function (functools.wraps)."""
    def documented() -> None:
        """Docs."""

    wrapped = propagate.wrap(documented)
    assert wrapped.__name__ == "documented"
    assert wrapped.__doc__ == "Docs."
    assert wrapped.__wrapped__ is documented


# I8: no tracer provider


NO_PROVIDER = textwrap.dedent("""
    import contextvars, threading, warnings
    warnings.simplefilter("error")
    from opentelemetry import trace
    import propagate

    VAR = contextvars.ContextVar("var")
    VAR.set("crossed")
    tracer = trace.get_tracer("no-provider")

    def task():
        with tracer.start_as_current_span("child") as s:
            return VAR.get(), s.is_recording(), trace.get_current_span().is_recording()

    with tracer.start_as_current_span("outer") as outer:
        assert not outer.is_recording()
        for options in ({}, {"task_spans": True}, {"task_spans": True, "link": True}):
            with propagate.ThreadPoolExecutor(2, **options) as pool:
                assert pool.submit(task).result(timeout=10) == ("crossed", False, False)
                assert list(pool.map(lambda i: VAR.get(), range(3))) == ["crossed"] * 3
        seen = []
        thread = propagate.Thread(target=lambda: seen.append(task()))
        thread.start()
        thread.join(10)
        timer = propagate.Timer(0, lambda: seen.append(task()))
        timer.start()
        timer.join(10)
        seen.append(propagate.wrap(task)())
        assert seen == [("crossed", False, False)] * 3, seen
    print("ok")
""")


def test_no_tracer_provider():
    """I8: with no tracer provider, pools, task spans, Thread, Timer and wrap work silently."""
    result = subprocess.run([sys.executable, "-c", NO_PROVIDER], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
    assert result.stderr == ""
