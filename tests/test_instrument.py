"""propagate/_instrument.py: instrument() and uninstrument(), the stdlib patched, for real.

Every test leaves the process uninstrumented (the ``instrumented`` fixture), since other
tests run in the same process and must see the stdlib as it is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import importlib.metadata
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from propagate import debug
from tests import process_tasks as pt
from tests.helpers import assert_freed, current_ids, one_span, setting

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("test_instrument.request",
                                                              default="unset")
WAIT = 60  # seconds: every wait in this file is bounded
# Python 3.14's flag: a new thread starts in a copy of its starter's context by itself
INHERITS = bool(getattr(sys.flags, "thread_inherit_context", False))
ROOT = Path(__file__).parent.parent
OTEL_THREADING = "opentelemetry.instrumentation.threading"
# What instrument() patches, as the stdlib has it
PLACES = [(cf.ThreadPoolExecutor, "submit"), (cf.ProcessPoolExecutor, "submit"),
          (threading.Thread, "start"), (threading.Timer, "start")]


def attributes() -> list[object]:
    """What each patched class holds in its own ``__dict__`` (None: nothing)."""
    return [vars(cls).get(name) for cls, name in PLACES]


def same(found: list[object], expected: list[object]) -> bool:
    """Whether two lists hold the very same objects."""
    return len(found) == len(expected) and all(
        a is b for a, b in zip(found, expected, strict=True))


@pytest.fixture
def instrumented() -> Iterator[None]:
    """propagate.instrument() for the test; afterwards the stdlib is exactly as it was."""
    before = attributes()
    propagate.instrument()
    try:
        yield
    finally:
        propagate.uninstrument()
        assert same(attributes(), before)


@pytest.fixture
def otel_threading() -> Iterator[Any]:
    """OpenTelemetry's threading instrumentor, surely off again after the test."""
    threading_instrumentation = pytest.importorskip(OTEL_THREADING)
    instrumentor = threading_instrumentation.ThreadingInstrumentor()
    try:
        yield instrumentor
    finally:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def frames() -> list[str]:
    """The task's stack, each frame as ``module.function``: in a pool, down to the work
    item's ``run`` (what is below is the worker thread's, not the task's)."""
    frame = sys._getframe(1)
    found = []
    while frame is not None:
        found.append(f"{frame.f_globals.get('__name__')}.{frame.f_code.co_name}")
        if found[-1] == "concurrent.futures.thread.run":
            break
        frame = frame.f_back
    return found


def observe() -> tuple[str, tuple[int, int], list[str]]:
    """What a task sees: the ContextVar, the current span, and its own stack."""
    return REQUEST.get(), current_ids(), frames()


def in_request(tracer: trace.Tracer, fn: Callable[[], Any]) -> tuple[Any, tuple[int, int]]:
    """``fn()`` with REQUEST set and a span current; and that span's ids."""
    with setting(REQUEST, "req-1"), tracer.start_as_current_span("request"):
        return fn(), current_ids()


def in_thread(make: Callable[[Callable[[], None]], threading.Thread]) -> Any:
    """Start the thread ``make`` builds around a function that records `observe`; its record."""
    seen: list[Any] = []
    thread = make(lambda: seen.append(observe()))
    thread.start()
    thread.join(WAIT)
    return seen[0]


def otel_frames(stack: list[str]) -> list[str]:
    return [f for f in stack if f.startswith(OTEL_THREADING)]


# -- threads: snapshots ----------------------------------------------------------------------


def test_the_stdlib_thread_pool_carries_the_context(instrumented: None,
                                                    tracer: trace.Tracer) -> None:
    """I1: a stdlib ThreadPoolExecutor's task sees the submitter's ContextVar and span."""
    with cf.ThreadPoolExecutor(2) as pool:
        (value, ids, _), request = in_request(tracer, lambda: pool.submit(observe).result(WAIT))
    assert (value, ids) == ("req-1", request)


def test_a_tasks_changes_do_not_flow_back(instrumented: None) -> None:
    """I2: what a task sets is seen neither by the submitter nor by the next task."""
    with cf.ThreadPoolExecutor(1) as pool, setting(REQUEST, "submitter"):
        pool.submit(REQUEST.set, "task").result(WAIT)
        assert REQUEST.get() == "submitter"
        assert pool.submit(REQUEST.get).result(WAIT) == "submitter"


def test_a_subclass_of_the_stdlib_pool(instrumented: None, tracer: trace.Tracer) -> None:
    """I1: a subclass that does not override submit carries the context too."""
    class Pool(cf.ThreadPoolExecutor):
        pass

    with Pool(1) as pool:
        (value, ids, _), request = in_request(tracer, lambda: pool.submit(observe).result(WAIT))
    assert (value, ids) == ("req-1", request)


def test_the_first_submitter_does_not_stay_in_the_worker(instrumented: None) -> None:
    """I2, I5: a worker started by a submit keeps nothing of that submitter's context: a
    later task without the value does not see it, and the worker's own context is empty."""
    class Held:
        pass

    held = Held()
    own: list[list[Any]] = []
    holder: contextvars.ContextVar[Held | None] = contextvars.ContextVar("holder", default=None)

    def record_own_context() -> None:  # the initializer runs in the worker's own context
        own.append(list(contextvars.copy_context().items()))

    with cf.ThreadPoolExecutor(1, initializer=record_own_context) as pool:
        with setting(REQUEST, "first"), setting(holder, held):
            assert pool.submit(REQUEST.get).result(WAIT) == "first"
        assert pool.submit(REQUEST.get).result(WAIT) == "unset"
        assert pool.submit(holder.get).result(WAIT) is None
        ref = weakref.ref(held)
        del held
        assert_freed(ref)
    assert own == [[]]


def test_a_thread_that_overrides_run(instrumented: None, tracer: trace.Tracer) -> None:
    """I1, I2: threading.Thread with its own run runs in the starter's context; what it sets
    stays there."""
    class Worker(threading.Thread):
        def run(self) -> None:
            self.seen = observe()
            REQUEST.set("thread")

    def start() -> Any:
        worker = Worker()
        worker.start()
        worker.join(WAIT)
        assert REQUEST.get() == "req-1"
        assert "run" not in vars(worker)  # the snapshot went with the start
        return worker.seen

    (value, ids, _), request = in_request(tracer, start)
    assert (value, ids) == ("req-1", request)


def test_a_plain_thread_and_a_timer(instrumented: None, tracer: trace.Tracer) -> None:
    """I1: threading.Thread(target=...) and threading.Timer run in the starter's context."""
    def both() -> list[Any]:
        return [in_thread(lambda f: threading.Thread(target=f)),
                in_thread(lambda f: threading.Timer(0.001, f))]

    seen, request = in_request(tracer, both)
    assert [(value, ids) for value, ids, _ in seen] == [("req-1", request)] * 2


def test_a_thread_given_a_context_keeps_it(instrumented: None) -> None:
    """I1: on 3.14+, a Thread given ``context=`` runs in that context, not the starter's."""
    if sys.version_info < (3, 14):
        pytest.skip("Thread(context=...) is new in Python 3.14")
    given = contextvars.Context()
    given.run(REQUEST.set, "given")
    with setting(REQUEST, "starter"):
        seen = in_thread(lambda f: threading.Thread(target=f, context=given))  # type: ignore[call-arg,unused-ignore]
    assert seen[0] == "given"


# -- asyncio ---------------------------------------------------------------------------------


def test_the_loops_default_executor(instrumented: None, tracer: trace.Tracer) -> None:
    """I1: loop.run_in_executor(None, fn) runs fn in the caller's context."""
    async def main() -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, observe)

    (value, ids, _), request = in_request(tracer, lambda: asyncio.run(main()))
    assert (value, ids) == ("req-1", request)


def test_getaddrinfo_resolves_in_the_callers_context(instrumented: None) -> None:
    """I1: loop.getaddrinfo resolves in a pool task that sees the caller's ContextVar."""
    seen: list[str] = []

    class Observed(cf.ThreadPoolExecutor):
        def submit(self, fn: Callable[..., Any], /, *args: Any,
                   **kwargs: Any) -> cf.Future[Any]:
            def observed() -> Any:
                seen.append(REQUEST.get())
                return fn(*args, **kwargs)

            return super().submit(observed)

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(Observed(1))
        with setting(REQUEST, "req-dns"):
            return await loop.getaddrinfo("localhost", 80)

    assert asyncio.run(main())
    assert seen == ["req-dns"]


def test_asyncio_to_thread_is_not_bound_twice(instrumented: None) -> None:
    """I1: asyncio.to_thread binds its call itself: the task carries the context, and is
    not snapshotted again (under jitter, a snapshot propagate takes adds a switch frame)."""
    async def main() -> Any:
        with setting(REQUEST, "req-2"):
            return await asyncio.to_thread(observe)

    with debug.jitter(probability=0):
        value, _, stack = asyncio.run(main())
    assert value == "req-2"
    assert "propagate._switch.around" not in stack


def test_propagates_own_classes_are_not_bound_twice(instrumented: None) -> None:
    """I1: propagate's pool, Thread, Timer, to_thread and wrap_executor bind each task once,
    and the stdlib pool patched binds once: one switch frame under jitter, each."""
    async def helper(executor: cf.Executor | None) -> Any:
        return await propagate.to_thread(observe, executor=executor)

    with debug.jitter(probability=0), setting(REQUEST, "req-3"), \
            propagate.ThreadPoolExecutor(1) as ours, cf.ThreadPoolExecutor(1) as stdlib:
        seen = [ours.submit(observe).result(WAIT),
                stdlib.submit(observe).result(WAIT),
                propagate.wrap_executor(stdlib).submit(observe).result(WAIT),
                in_thread(lambda f: propagate.Thread(target=f)),
                in_thread(lambda f: propagate.Timer(0.001, f)),
                asyncio.run(helper(None)),
                asyncio.run(helper(stdlib))]
    assert [value for value, _, _ in seen] == ["req-3"] * len(seen)
    assert [stack.count("propagate._switch.around") for _, _, stack in seen] == [1] * len(seen)


def test_a_value_in_the_context_is_freed_after_the_task(instrumented: None) -> None:
    """I5: a value of the submitted context is freed once the task and the thread are done."""
    class Held:
        pass

    holder: contextvars.ContextVar[Held | None] = contextvars.ContextVar("holder", default=None)
    held = Held()
    ref = weakref.ref(held)
    with cf.ThreadPoolExecutor(1) as pool:
        with setting(holder, held):
            pool.submit(holder.get).result(WAIT)
            in_thread(lambda f: threading.Thread(target=f))
        del held
        assert_freed(ref)


# -- processes and subinterpreters: detached contexts ---------------------------------------


def test_the_stdlib_process_pool_carries_the_detached_context(
        instrumented: None, mp_context: multiprocessing.context.BaseContext,
        tracer: trace.Tracer, exporter: InMemorySpanExporter) -> None:
    """I1, I2, I6: a stdlib ProcessPoolExecutor's task sees the registered ContextVar and
    the span; its spans come home once, under the submitter's span; a worker forked by the
    first submit keeps nothing of that submitter's unregistered values."""
    def run() -> Any:
        with cf.ProcessPoolExecutor(1, mp_context=mp_context) as pool, \
                setting(pt.REQUEST_ID, "req-p"), setting(pt.UNREGISTERED, "leaked"):
            seen = pool.submit(pt.observe).result(WAIT)
            pool.submit(pt.record_spans, "in-worker").result(WAIT)
            depth = pool.submit(pt.detached_depth).result(WAIT)
            return seen, depth, len(exporter.get_finished_spans())  # before the request ends

    (seen, depth, home), request = in_request(tracer, run)
    assert (seen["trace_id"], seen["span_id"]) == request
    assert (seen["request_id"], seen["unregistered"]) == ("req-p", "default")
    assert seen["pid"] != os.getpid()
    assert depth == 1
    assert home == 1
    span = one_span(exporter, "in-worker")
    assert span.parent is not None and span.parent.span_id == request[1]


def test_the_stdlib_process_pool_pickles_where_it_did(instrumented: None) -> None:
    """I7, API: instrumented, the stdlib's process pool still pickles a task when it sends
    it: what cannot be pickled fails on the future, not at submit; a lambda, which the
    stdlib's pool refuses, is sent by value, as propagate's own pool sends it."""
    with cf.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(pt.square, threading.Lock())  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="lock"):
            future.result(WAIT)
        assert pool.submit(lambda: 6 * 7).result(WAIT) == 42


def test_propagates_process_pool_is_not_bound_twice(
        instrumented: None, tracer: trace.Tracer, exporter: InMemorySpanExporter) -> None:
    """I6: propagate's ProcessPoolExecutor, and wrap_executor over the stdlib's, send each
    task detached once: one task span, one detached run in the worker."""
    context = multiprocessing.get_context("spawn")
    with propagate.ProcessPoolExecutor(1, context, task_spans=True) as ours, \
            cf.ProcessPoolExecutor(1, mp_context=context) as stdlib:
        depths, _ = in_request(tracer, lambda: [
            ours.submit(pt.detached_depth).result(WAIT),
            propagate.wrap_executor(stdlib).submit(pt.detached_depth).result(WAIT)])
    assert depths == [1, 1]
    one_span(exporter, "detached_depth")


@pytest.mark.skipif(sys.version_info < (3, 14),
                    reason="InterpreterPoolExecutor is new in Python 3.14")
def test_the_stdlib_interpreter_pool_carries_the_detached_context(
        instrumented: None, tracer: trace.Tracer, exporter: InMemorySpanExporter) -> None:
    """I1, I6: 3.14's stdlib InterpreterPoolExecutor, a ThreadPoolExecutor subclass, gets a
    detached context (not a snapshot, which cannot cross): the registered ContextVar and the
    span cross, and the subinterpreter's spans come home once."""
    def run() -> Any:
        with cf.InterpreterPoolExecutor(1) as pool, setting(pt.REQUEST_ID, "req-i"):  # type: ignore[attr-defined,unused-ignore]
            seen = pool.submit(pt.observe).result(WAIT)
            pool.submit(pt.record_spans, "in-interpreter").result(WAIT)
            depth = pool.submit(pt.detached_depth).result(WAIT)
            return seen, depth

    (seen, depth), request = in_request(tracer, run)
    assert (seen["trace_id"], seen["span_id"]) == request
    assert seen["request_id"] == "req-i"
    assert depth == 1
    span = one_span(exporter, "in-interpreter")
    assert span.parent is not None and span.parent.span_id == request[1]


# -- OpenTelemetry's threading instrumentor, on as well --------------------------------------


def seen_through_the_stdlib(tracer: trace.Tracer) -> tuple[list[Any], tuple[int, int]]:
    """What a task of the stdlib's pool, a Thread and a Timer see, in a request."""
    def all_three() -> list[Any]:
        with cf.ThreadPoolExecutor(1) as pool:
            return [pool.submit(observe).result(WAIT),
                    in_thread(lambda f: threading.Thread(target=f)),
                    in_thread(lambda f: threading.Timer(0.001, f))]

    return in_request(tracer, all_three)


@pytest.mark.parametrize("otel_first", [True, False], ids=["otel-first", "propagate-first"])
def test_with_otels_threading_instrumentor(otel_threading: Any, otel_first: bool,
                                           tracer: trace.Tracer) -> None:
    """I1, API: with OpenTelemetry's threading instrumentor on too, in either order, each
    task is bound once (no frame of it in the task) and sees the context; both uninstrument
    in reverse order, leaving the stdlib exactly as it was."""
    before = attributes()
    if otel_first:
        otel_threading.instrument()
    propagate.instrument()
    try:
        if not otel_first:
            otel_threading.instrument()
        seen, request = seen_through_the_stdlib(tracer)
    finally:
        if not otel_first:
            otel_threading.uninstrument()
        propagate.uninstrument()
    if otel_first:
        otel_threading.uninstrument()
    assert [(value, ids) for value, ids, _ in seen] == [("req-1", request)] * 3
    assert [otel_frames(stack) for _, _, stack in seen] == [[]] * 3
    assert same(attributes()[:3], before[:3])


@pytest.mark.parametrize("otel_first", [True, False], ids=["otel-first", "propagate-first"])
def test_uninstrumented_out_of_order(otel_threading: Any, otel_first: bool,
                                     tracer: trace.Tracer) -> None:
    """I1, API: uninstrumented in the order they were instrumented, each leaves the other
    working, and at the end the stdlib has its own methods again."""
    before = attributes()[:3]
    first, second = ((otel_threading.instrument, otel_threading.uninstrument),
                     (propagate.instrument, propagate.uninstrument))[::1 if otel_first else -1]
    first[0]()
    try:
        second[0]()
        first[1]()
        seen, request = seen_through_the_stdlib(tracer)  # only the second is on
    finally:
        second[1]()
        if otel_threading.is_instrumented_by_opentelemetry:
            otel_threading.uninstrument()
    if otel_first:  # propagate alone was on: OpenTelemetry's wrappers were not put back
        assert [(value, ids) for value, ids, _ in seen] == [("req-1", request)] * 3
        assert [otel_frames(stack) for _, _, stack in seen] == [[]] * 3
    else:  # OpenTelemetry's alone: the span, not the ContextVar, through its wrappers
        # (new threads inherit the whole context under thread_inherit_context, the pool's
        # worker too, started by the submit)
        value = "req-1" if INHERITS else "unset"
        assert [(value, ids) for value, ids, _ in seen] == [(value, request)] * 3
        assert all(otel_frames(stack) for _, _, stack in seen)
    assert same(attributes()[:3], before)


# -- on and off ------------------------------------------------------------------------------


def test_instrument_is_idempotent_and_uninstrument_restores(tracer: trace.Tracer) -> None:
    """API: instrument() twice is one instrumentation; uninstrument() gives the stdlib its
    very own methods back, and when off does nothing."""
    before = attributes()
    propagate.uninstrument()
    assert attributes() == before
    propagate.instrument()
    try:
        patched = attributes()
        assert patched != before
        propagate.instrument()
        assert same(attributes(), patched)
    finally:
        propagate.uninstrument()
    propagate.uninstrument()
    assert same(attributes(), before)
    with cf.ThreadPoolExecutor(1) as pool:
        pool.submit(int).result(WAIT)  # its worker starts before the value is set
        with setting(REQUEST, "off"):
            assert pool.submit(REQUEST.get).result(WAIT) == "unset"


def test_instrument_is_thread_safe() -> None:
    """API: instrument() and uninstrument() racing in threads leave one instrumentation or
    none, never a method patched over a patched one."""
    before = attributes()
    barrier = threading.Barrier(8)

    def toggle(i: int) -> None:
        barrier.wait(WAIT)
        for _ in range(50):
            (propagate.instrument if i % 2 else propagate.uninstrument)()

    threads = [threading.Thread(target=toggle, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    propagate.uninstrument()
    assert same(attributes(), before)


# -- the entry point: opentelemetry-instrument ----------------------------------------------


def entry_point_path() -> str:
    """The PYTHONPATH of a child: the checkout first, for the code; the entry point itself is
    the installed distribution's (a stale install, from before it existed, fails here)."""
    found = importlib.metadata.entry_points(group="opentelemetry_instrumentor", name="propagate")
    assert found, "propagate's opentelemetry_instrumentor entry point is not installed"
    return str(ROOT)


def run_instrumented(tmp_path: Path, code: str, **env: str) -> str:
    """``opentelemetry-instrument python -c code``; what it printed."""
    command = Path(sys.executable).with_name("opentelemetry-instrument")  # the test extra's
    environ = {**os.environ, "PYTHONPATH": entry_point_path(),
               "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
               "OTEL_LOGS_EXPORTER": "none", **env}
    environ.pop("OTEL_PYTHON_CONTEXT", None)
    done = subprocess.run([str(command), sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=WAIT, env=environ,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


CARRIES = """
    import concurrent.futures, contextvars
    var = contextvars.ContextVar("var", default="not carried")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(int).result()  # its worker starts first (3.14's inheriting threads)
        var.set("carried")
        print(pool.submit(var.get).result())
"""


def test_the_entry_point_loads_the_instrumentor(tmp_path: Path) -> None:
    """API: the ``opentelemetry_instrumentor`` entry point ``propagate`` is a BaseInstrumentor
    whose instrument() and uninstrument() are propagate's, with no dependencies."""
    code = """
        import importlib.metadata, threading
        from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
        [found] = importlib.metadata.entry_points(group="opentelemetry_instrumentor",
                                                  name="propagate")
        instrumentor = found.load()()
        assert isinstance(instrumentor, BaseInstrumentor)
        assert list(instrumentor.instrumentation_dependencies()) == []
        start = threading.Thread.start
        instrumentor.instrument()
        assert threading.Thread.start is not start
        instrumentor.uninstrument()
        assert threading.Thread.start is start
        print(found.value)
    """
    environ = {**os.environ, "PYTHONPATH": entry_point_path()}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=WAIT, env=environ, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "propagate._instrumentor:PropagateInstrumentor"


def test_opentelemetry_instrument_turns_it_on(tmp_path: Path) -> None:
    """I1: under ``opentelemetry-instrument``, a ContextVar reaches a stdlib pool's task."""
    assert run_instrumented(tmp_path, CARRIES) == "carried"


def test_opentelemetry_instrument_can_leave_it_off(tmp_path: Path) -> None:
    """API: OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=propagate leaves the stdlib as it is."""
    assert run_instrumented(tmp_path, CARRIES, OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="propagate"
                            ) == "not carried"
