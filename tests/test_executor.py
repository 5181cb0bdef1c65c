"""propagate/_executor.py: wrap_executor and the one submit path it shares with the pools."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import functools
import inspect
import multiprocessing
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from tests.helpers import START_METHODS, assert_freed, one_span

WAIT = 60  # seconds: generous, process pools start slowly on a busy machine

PLAIN: contextvars.ContextVar[str] = contextvars.ContextVar("test_executor.plain")
REQUEST_ID: contextvars.ContextVar[str] = propagate.register(
    contextvars.ContextVar("test_executor.request_id"))


DROP_INS = [(propagate.ThreadPoolExecutor, cf.ThreadPoolExecutor),
             (propagate.ProcessPoolExecutor, cf.ProcessPoolExecutor)]
if sys.version_info >= (3, 14):
    DROP_INS.append((propagate.InterpreterPoolExecutor, cf.InterpreterPoolExecutor))
OURS = {"task_spans", "link", "relay", "relay_logs"}  # what the drop-ins add, keyword-only
NEWER = {"ctxkwargs", "max_tasks_per_child"}  # stdlib parameters of newer Pythons


@pytest.mark.parametrize(("ours", "stdlib"), DROP_INS, ids=lambda c: c.__module__)
def test_drop_ins_keep_every_stdlib_parameter(ours: type, stdlib: type) -> None:
    """API: on this Python, every stdlib parameter, in order, same kind and default.

    Fails on the first Python release that adds a parameter the drop-in does not take.
    """
    assert issubclass(ours, stdlib)
    def shape(fn: Any) -> list[tuple[str, Any, Any]]:
        params = inspect.signature(fn).parameters.values()
        return [(p.name, p.kind, p.default) for p in params if p.name not in OURS]

    stdlib_names = inspect.signature(stdlib.__init__).parameters.keys()
    # Taken on every Python, refused (TypeError) where the stdlib does not have them yet.
    newer = [p for p in shape(ours.__init__) if p[0] in NEWER and p[0] not in stdlib_names]
    assert [p for p in shape(ours.__init__) if p not in newer] == shape(stdlib.__init__)
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such'"):
        ours(no_such=1)  # refused as the stdlib refuses it
    added = inspect.signature(ours.__init__).parameters.keys() & OURS
    assert all(inspect.signature(ours.__init__).parameters[name].kind
               is inspect.Parameter.KEYWORD_ONLY for name in added)
    for method in ("submit", "map", "shutdown"):  # what callers use: the stdlib's own shape
        assert shape(getattr(ours, method)) == shape(getattr(stdlib, method)), method


def in_worker() -> dict[str, Any]:
    """What a task sees where it runs (module level, so plain pickle can send it)."""
    with trace.get_tracer("tests").start_as_current_span("in-worker") as s:
        parent = s.parent
    sc = trace.get_current_span().get_span_context()
    return {
        "pid": os.getpid(),
        "request_id": REQUEST_ID.get("unset"),
        "plain": PLAIN.get("unset"),
        "baggage": dict(baggage.get_all()),
        "ids": (sc.trace_id, sc.span_id, sc.is_remote),
        "span_parent": None if parent is None else (parent.trace_id, parent.span_id),
    }


def task_fn() -> int:
    """A named task, for task span names."""
    return os.getpid()


# Thread pools: snapshots


@pytest.fixture
def wrapped_threads() -> Iterator[cf.Executor]:
    with propagate.wrap_executor(cf.ThreadPoolExecutor(max_workers=2)) as executor:
        yield executor


def test_wrapped_thread_pool_carries_plain_contextvar(wrapped_threads):
    """I1: a wrapped thread pool runs tasks in a snapshot: an unregistered ContextVar crosses."""
    def body() -> str:
        PLAIN.set("snapshot")
        return wrapped_threads.submit(PLAIN.get).result(timeout=WAIT)

    assert contextvars.copy_context().run(body) == "snapshot"


def test_wrapped_thread_pool_carries_span(wrapped_threads, tracer):
    """I1: a task in a wrapped thread pool sees the submitter's span as its current span."""
    with tracer.start_as_current_span("submitter") as parent:
        seen = wrapped_threads.submit(in_worker).result(timeout=WAIT)
    sc = parent.get_span_context()
    assert seen["ids"] == (sc.trace_id, sc.span_id, False)
    assert seen["span_parent"] == (sc.trace_id, sc.span_id)


def test_wrapped_thread_pool_changes_do_not_flow_back(wrapped_threads):
    """I2: a ContextVar set in a wrapped thread pool's task is invisible to the submitter."""
    def body() -> str:
        PLAIN.set("submitter")
        wrapped_threads.submit(PLAIN.set, "task").result(timeout=WAIT)
        return PLAIN.get()

    assert contextvars.copy_context().run(body) == "submitter"


def test_wrapped_thread_pool_map(wrapped_threads):
    """I1: the wrapper's map keeps input order and runs each call in the submitter's context."""
    def body() -> list[str]:
        PLAIN.set("mapped")
        return list(wrapped_threads.map(lambda i: f"{PLAIN.get()}-{i}", range(5), timeout=WAIT))

    assert contextvars.copy_context().run(body) == [f"mapped-{i}" for i in range(5)]


def test_wrapper_shutdown_and_context_manager():
    """API: shutdown and the with block of the wrapper shut the wrapped executor down."""
    inner = cf.ThreadPoolExecutor(max_workers=1)
    with propagate.wrap_executor(inner) as executor:
        assert executor.submit(int, "7").result(timeout=WAIT) == 7
    with pytest.raises(RuntimeError):
        inner.submit(int)
    with pytest.raises(RuntimeError):
        executor.submit(int)

    other = cf.ThreadPoolExecutor(max_workers=1)
    wrapper = propagate.wrap_executor(other)
    release = threading.Event()
    running = wrapper.submit(release.wait, WAIT)
    queued = wrapper.submit(int)
    wrapper.shutdown(wait=False, cancel_futures=True)
    release.set()
    other.shutdown(wait=True)
    assert running.result(timeout=WAIT) is True
    assert queued.cancelled()


def test_wrapped_thread_pool_task_spans(exporter, tracer):
    """I4: task_spans through the wrapper: a span per task, child of the submitter."""
    executor = propagate.wrap_executor(cf.ThreadPoolExecutor(1), task_spans=True)
    with executor, tracer.start_as_current_span("submitter") as parent:
        executor.submit(task_fn).result(timeout=WAIT)
    task = one_span(exporter, task_fn.__qualname__)
    assert task.parent.span_id == parent.get_span_context().span_id
    assert task.attributes["propagate.queue_seconds"] >= 0
    assert task.attributes["thread.name"] != threading.current_thread().name


def assert_linked(task, parent):
    """The task span is the root of a new trace, with one link to the submitter's span."""
    sc = parent.get_span_context()
    assert task.parent is None
    assert task.context.trace_id != sc.trace_id
    assert [(link.context.trace_id, link.context.span_id) for link in task.links] == [
        (sc.trace_id, sc.span_id)]


def test_wrapped_thread_pool_link(exporter, tracer):
    """I1: link through the wrapper: the task span starts a new trace linked to the submitter."""
    executor = propagate.wrap_executor(cf.ThreadPoolExecutor(1), task_spans=True, link=True)
    with executor, tracer.start_as_current_span("submitter") as parent:
        executor.submit(task_fn).result(timeout=WAIT)
    assert_linked(one_span(exporter, task_fn.__qualname__), parent)


# Process pools: detached contexts


@pytest.fixture
def wrapped_processes(mp_context) -> Iterator[cf.Executor]:
    """A one-worker wrapped process pool whose worker already runs.

    Under fork a worker is a copy of the thread that submitted first, ContextVars and all;
    starting it here, before a test sets anything, keeps the test about what crosses.
    """
    with propagate.wrap_executor(cf.ProcessPoolExecutor(1, mp_context=mp_context)) as executor:
        executor.submit(int).result(timeout=WAIT)
        yield executor


@pytest.fixture
def submitter_context() -> Iterator[None]:
    """A registered value, an unregistered one and baggage, set for the test only."""
    tokens = REQUEST_ID.set("req-42"), PLAIN.set("plain")
    bag = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    yield
    otel_context.detach(bag)
    REQUEST_ID.reset(tokens[0])
    PLAIN.reset(tokens[1])


def test_wrapped_process_pool_detached_context(wrapped_processes, submitter_context, tracer,
                                               exporter):
    """I1: a wrapped process pool carries registered vars, baggage and parent, not plain vars."""
    with tracer.start_as_current_span("submitter") as parent:
        seen = wrapped_processes.submit(in_worker).result(timeout=WAIT)
    sc = parent.get_span_context()
    assert seen["pid"] != os.getpid()
    assert seen["request_id"] == "req-42"
    assert seen["plain"] == "unset"
    assert seen["baggage"] == {"tenant": "acme"}
    assert seen["ids"] == (sc.trace_id, sc.span_id, True)
    assert seen["span_parent"] == (sc.trace_id, sc.span_id)
    relayed = one_span(exporter, "in-worker")
    assert relayed.parent.span_id == sc.span_id


def test_wrapped_process_pool_lambda(wrapped_processes, submitter_context, tracer):
    """I1: a lambda reaches a wrapped process pool through cloudpickle and reads registered vars."""
    with tracer.start_as_current_span("submitter") as parent:
        seen = wrapped_processes.submit(
            lambda: (REQUEST_ID.get(), trace.get_current_span().get_span_context().span_id)
        ).result(timeout=WAIT)
        mapped = list(wrapped_processes.map(lambda i: f"{REQUEST_ID.get()}-{i}", range(3),
                                            timeout=WAIT))
    assert seen == ("req-42", parent.get_span_context().span_id)
    assert mapped == ["req-42-0", "req-42-1", "req-42-2"]


def test_wrapped_process_pool_task_spans(mp_context, exporter, tracer):
    """I6: task_spans through a wrapped process pool: the task span comes home as a child."""
    inner = cf.ProcessPoolExecutor(1, mp_context=mp_context)
    executor = propagate.wrap_executor(inner, task_spans=True)
    with executor, tracer.start_as_current_span("submitter") as parent:
        pid = executor.submit(task_fn).result(timeout=WAIT)
        task = one_span(exporter, task_fn.__qualname__)  # before the future resolved
    assert task.parent.span_id == parent.get_span_context().span_id
    assert task.attributes["process.pid"] == pid != os.getpid()
    assert task.attributes["propagate.queue_seconds"] >= 0


def test_wrapped_process_pool_link(mp_context, exporter, tracer):
    """I1: link through a wrapped process pool: a new trace linked to the submitter's span."""
    inner = cf.ProcessPoolExecutor(1, mp_context=mp_context)
    executor = propagate.wrap_executor(inner, task_spans=True, link=True)
    with executor, tracer.start_as_current_span("submitter") as parent:
        executor.submit(task_fn).result(timeout=WAIT)
    assert_linked(one_span(exporter, task_fn.__qualname__), parent)


def test_wrapped_process_pool_unpicklable_value_fails_at_submit():
    """I7: an unpicklable registered value fails at submit, naming the variable, before queueing."""
    inner = cf.ProcessPoolExecutor(1)
    executor = propagate.wrap_executor(inner)
    token = REQUEST_ID.set(threading.Lock())  # type: ignore[arg-type]
    try:
        with pytest.raises(propagate.ContextSerializationError, match=REQUEST_ID.name):
            executor.submit(task_fn)
    finally:
        REQUEST_ID.reset(token)
        executor.shutdown()
    assert not inner._pending_work_items


# Misuse


@pytest.mark.parametrize("bad", [None, "executor", cf.Future, lambda fn: fn],
                         ids=["None", "str", "class", "function"])
def test_wrap_executor_refuses_non_executor(bad):
    """I7: wrap_executor of anything but a concurrent.futures.Executor raises TypeError."""
    with pytest.raises(TypeError, match="Executor"):
        propagate.wrap_executor(bad)


# -- I5 for every executor kind, under thread_inherit_context too ---------------------------


class Held:
    """A value that can be weakly referenced, set in the submitter's context."""


HELD: contextvars.ContextVar[Held] = contextvars.ContextVar("test_executor.held")


def _process_kinds() -> list[Any]:
    """propagate's process pool under each start method: fork copies the forking thread."""
    return [pytest.param(functools.partial(propagate.ProcessPoolExecutor, 1,
                                           multiprocessing.get_context(method)),
                         id=f"processes-{method}") for method in START_METHODS]


def _interpreter_kinds() -> list[Any]:
    if sys.version_info < (3, 14):
        return []
    return [pytest.param(lambda: propagate.InterpreterPoolExecutor(1), id="interpreters"),
            pytest.param(lambda: propagate.wrap_executor(cf.InterpreterPoolExecutor(1)),
                         id="wrap-interpreters")]


@pytest.mark.parametrize("make", [
    pytest.param(lambda: propagate.ThreadPoolExecutor(1), id="threads"),
    pytest.param(lambda: propagate.wrap_executor(cf.ThreadPoolExecutor(1)), id="wrap-threads"),
    *_process_kinds(),
    pytest.param(lambda: propagate.wrap_executor(cf.ProcessPoolExecutor(1)), id="wrap-processes"),
    *_interpreter_kinds(),
])
def test_no_executor_keeps_the_submitters_context(make: Callable[[], cf.Executor]) -> None:
    """I5: after its task, nothing the submitter's context held is kept alive by the pool.

    The first submit starts the worker: under 3.14's thread_inherit_context the stdlib
    would start it in a copy of the submitter's context and keep that for its life. A
    process pool runs under each start method: under fork, submit forks the worker.
    """
    with make() as executor:
        def submit() -> weakref.ref[Held]:
            held = Held()
            HELD.set(held)
            assert executor.submit(os.getpid).result(timeout=WAIT) > 0
            return weakref.ref(held)

        ref = contextvars.Context().run(submit)
        assert_freed(ref)


@pytest.mark.parametrize("start", [
    pytest.param(lambda fn: propagate.Thread(target=fn), id="Thread"),
    pytest.param(lambda fn: propagate.Timer(0, fn), id="Timer"),
])
def test_no_thread_keeps_its_starters_context(start: Callable[[Callable[[], None]], Any]) -> None:
    """I5: a finished propagate.Thread or Timer, still referenced, holds nothing of its starter."""
    def started() -> tuple[Any, weakref.ref[Held]]:
        held = Held()
        HELD.set(held)
        thread = start(lambda: None)
        thread.start()
        thread.join(WAIT)
        return thread, weakref.ref(held)

    thread, ref = contextvars.Context().run(started)
    assert_freed(ref)
    assert not thread.is_alive()


@pytest.mark.parametrize("executor", [None, "threads"], ids=["default-executor", "threads"])
def test_to_thread_keeps_nothing(executor: str | None) -> None:
    """I5: to_thread, on the loop's default executor or a given pool, keeps nothing after."""
    pool = propagate.ThreadPoolExecutor(1) if executor else None

    async def main() -> weakref.ref[Held]:
        held = Held()
        HELD.set(held)
        await propagate.to_thread(os.getpid, executor=pool)
        ref = weakref.ref(held)
        del held
        HELD.set(Held())
        await asyncio.sleep(0)
        assert_freed(ref)
        return ref

    asyncio.run(main())
    if pool is not None:
        pool.shutdown()


@pytest.mark.skipif(sys.version_info < (3, 14), reason="map(buffersize=) is new in 3.14")
@pytest.mark.parametrize(("ours", "stdlib"), DROP_INS, ids=lambda c: c.__module__)
def test_map_with_buffersize_keeps_the_context(ours: type, stdlib: type) -> None:
    """I1: map(buffersize=) submits lazily; each item sees the caller's context."""
    from tests import process_tasks as pt

    def body() -> list[str]:
        pt.REQUEST_ID.set("buffered")
        with ours(2) as pool:
            return list(pool.map(pt.tagged, range(6), buffersize=2))

    assert contextvars.Context().run(body) == [f"buffered:{i}" for i in range(6)]


# -- options, checked at construction --------------------------------------------------------


def _every_kind() -> list[Any]:
    kinds = [propagate.ThreadPoolExecutor, propagate.ProcessPoolExecutor,
             lambda **kw: propagate.wrap_executor(cf.ThreadPoolExecutor(1), **kw)]
    if sys.version_info >= (3, 14):
        kinds.append(propagate.InterpreterPoolExecutor)
    return kinds


@pytest.mark.parametrize("make", _every_kind())
@pytest.mark.parametrize("flag", ["task_spans", "link", "relay"])
def test_non_bool_flags_fail_at_construction(make: Callable[..., Any], flag: str) -> None:
    """I7: task_spans="yes" (or link, relay) is refused where it is written, naming the flag."""
    if flag == "relay" and make is propagate.ThreadPoolExecutor:
        pytest.skip("threads have no relay")
    with pytest.raises(TypeError, match=f"{flag} must be True or False, not 'yes'"):
        make(**{flag: "yes"})


def test_link_alone_gives_a_linked_task_span(exporter: InMemorySpanExporter) -> None:
    """I4: link=True without task_spans still gives the task a span, linked, in a new trace."""
    with propagate.ThreadPoolExecutor(1, link=True) as pool, \
            trace.get_tracer("tests").start_as_current_span("caller") as caller:
        pool.submit(os.getpid).result(timeout=WAIT)
    task = one_span(exporter, "getpid")
    assert task.parent is None
    assert [lk.context.span_id for lk in task.links] == [caller.get_span_context().span_id]


# -- one capture path: composes with patched stdlib pools, and never binds twice ------------


@pytest.fixture
def patched_stdlib_submit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stdlib's ThreadPoolExecutor.submit patched as instrumentations patch it."""
    calls: list[str] = []
    original = cf.ThreadPoolExecutor.submit

    def submit(self: cf.ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(self).__name__)
        return original(self, fn, *args, **kwargs)

    monkeypatch.setattr(cf.ThreadPoolExecutor, "submit", submit)
    return calls


@pytest.mark.parametrize("task_spans", [False, True])
def test_pools_reach_a_patched_stdlib_submit(patched_stdlib_submit: list[str],
                                             task_spans: bool) -> None:
    """I1: every submit goes through the stdlib's submit by the MRO, patched or not."""
    with propagate.ThreadPoolExecutor(1, task_spans=task_spans) as pool:
        seen = in_request(lambda: pool.submit(REQUEST_ID.get).result(timeout=WAIT))
        assert list(pool.map(len, ["ab", "c"])) == [2, 1]
    wrapped = propagate.wrap_executor(cf.ThreadPoolExecutor(1))
    with wrapped:
        assert in_request(lambda: wrapped.submit(REQUEST_ID.get).result(timeout=WAIT)) == "r-1"
    assert seen == "r-1"
    assert patched_stdlib_submit == ["ThreadPoolExecutor"] * 4


def test_subclass_submit_is_honoured() -> None:
    """API: a subclass overriding submit sees every call, map's included."""
    class Counting(propagate.ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
            self.submitted += 1
            return super().submit(fn, *args, **kwargs)

    with Counting(1) as pool:
        assert in_request(lambda: list(pool.map(lambda _: REQUEST_ID.get(), range(3)))) == [
            "r-1"] * 3
    assert pool.submitted == 3


def in_request(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a fresh context where REQUEST_ID is "r-1"."""
    def body() -> Any:
        REQUEST_ID.set("r-1")
        return fn()

    return contextvars.Context().run(body)


def captures(fn: Callable[[], Any]) -> int:
    """How many snapshots or detached contexts propagate took while ``fn()`` ran."""
    with propagate.debug.jitter(0, probability=0.0, max_delay=0.0) as hook:
        fn()
    return hook.counts["capture"]


@pytest.mark.parametrize("make", [
    pytest.param(lambda: propagate.ThreadPoolExecutor(1), id="threads"),
    pytest.param(lambda: propagate.ProcessPoolExecutor(1), id="processes"),
    pytest.param(lambda: propagate.wrap_executor(cf.ThreadPoolExecutor(1)), id="wrapped"),
])
def test_wrapping_a_propagate_executor_binds_once(make: Callable[[], cf.Executor]) -> None:
    """I1: wrap_executor on an executor that already binds returns it: one capture per task."""
    with make() as executor:
        again = propagate.wrap_executor(executor)
        assert again is executor
        assert captures(lambda: again.submit(os.getpid).result(timeout=WAIT)) == 1


def test_wrapping_with_other_options_is_refused() -> None:
    """I7: asking a propagate executor for other options than it has fails, saying where."""
    with propagate.ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="set them where it is made"):
            propagate.wrap_executor(pool, task_spans=True)
        assert propagate.wrap_executor(pool) is pool
