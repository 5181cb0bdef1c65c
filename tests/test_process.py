"""propagate.ProcessPoolExecutor: the submitter's context into worker processes, spans back out.

Every test that uses a pool runs under each start method (fork, forkserver, spawn). The
task functions live in `tests.process_tasks`, so spawn and forkserver workers can import
them; lambdas, closures and local functions defined here cross by cloudpickle. I5, for
every pool and start method, is checked in test_executor.py; the envelope a task crosses
in, in test_wire.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from tests import process_tasks as pt
from tests.helpers import current_ids, extra_state, one_span, setting, with_baggage
from tests.process_tasks import REQUEST_ID, UNREGISTERED

TIMEOUT = 60  # generous: a loaded 2-core box starting spawn workers; only bounds a hang
REQUEST_ID_NAME = "tests.process_tasks.request_id"


# -- shared pools ------------------------------------------------------------------------

class _Pools:
    """One warm pool per start method and options, shut down when the module ends."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._pools: dict[tuple[Any, ...], propagate.ProcessPoolExecutor] = {}

    def get(self, mp_context: BaseContext, **options: bool) -> propagate.ProcessPoolExecutor:
        key = (mp_context.get_start_method(), tuple(sorted(options.items())))
        pool = self._pools.get(key)
        if pool is not None:
            try:
                pool.submit(pt.pid).result(timeout=TIMEOUT)
                return pool
            except BrokenProcessPool:  # an earlier test broke it: do not let that spread
                pass
        pool = self._stack.enter_context(
            propagate.ProcessPoolExecutor(max_workers=1, mp_context=mp_context, **options))
        # Start the worker now, in the fixture: tests find it warm and idle.
        pool.submit(pt.pid).result(timeout=TIMEOUT)
        self._pools[key] = pool
        return pool


@pytest.fixture(scope="module")
def pools() -> Iterator[_Pools]:
    with contextlib.ExitStack() as stack:
        yield _Pools(stack)


@pytest.fixture
def pool(pools: _Pools, mp_context: BaseContext) -> propagate.ProcessPoolExecutor:
    """A warm one-worker pool of this start method, shared by the module."""
    return pools.get(mp_context)


@pytest.fixture
def span_pool(pools: _Pools, mp_context: BaseContext) -> propagate.ProcessPoolExecutor:
    """A warm one-worker pool with ``task_spans=True``, shared by the module."""
    return pools.get(mp_context, task_spans=True)


# -- helpers -----------------------------------------------------------------------------

def relayed(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The exported spans that were recorded in another process."""
    return [s for s in exporter.get_finished_spans()
            if s.resource.attributes.get("process.pid", os.getpid()) != os.getpid()]


def assert_unique(exporter: InMemorySpanExporter) -> None:
    ids = [s.context.span_id for s in exporter.get_finished_spans()]
    assert len(ids) == len(set(ids)), ids


@contextlib.contextmanager
def held(pool: cf.Executor, gate: Path) -> Iterator[cf.Future[Any]]:
    """Keep the pool's worker busy until the block ends (the gate file appears)."""
    blocker = pool.submit(pt.wait_for, str(gate), "released")
    try:
        yield blocker
    finally:
        gate.touch()
    assert blocker.result(timeout=TIMEOUT) == "released"


def wait_running(fut: cf.Future[Any]) -> None:
    """Wait (bounded) until the pool has marked ``fut`` running: handed to the call queue."""
    deadline = time.monotonic() + TIMEOUT
    while not fut.running() and not fut.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fut.running()


def wait_done(futures: list[cf.Future[Any]]) -> None:
    """Wait (bounded) until every future is done; cf.wait never sees one the pool cancelled."""
    deadline = time.monotonic() + TIMEOUT
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(f.done() for f in futures), futures


# -- constructor ---------------------------------------------------------------------------

def test_max_workers_checked_as_the_stdlib_does() -> None:
    """API: a bad max_workers fails at construction with the stdlib's own message."""
    with pytest.raises(ValueError, match="max_workers must be greater than 0"):
        propagate.ProcessPoolExecutor(max_workers=0)


def test_tasks_of_one_request_share_a_template_and_nothing_leaks(
        mp_context: BaseContext, tracer: trace.Tracer) -> None:
    """I2: tasks of one request run in copies of one Context the worker made for them: what
    one sets (variables, the current span, baggage) the next of that request does not see."""
    with propagate.ProcessPoolExecutor(1, mp_context) as pool:
        before = pool.submit(pt.templates).result(timeout=TIMEOUT)  # a fork inherits some
        with tracer.start_as_current_span("request"), with_baggage(user="alice"), \
                setting(REQUEST_ID, "req-1"):
            ids = current_ids()
            leaked = pool.submit(pt.leak).result(timeout=TIMEOUT)
            after = pool.submit(pt.observe).result(timeout=TIMEOUT)
            made = pool.submit(pt.templates).result(timeout=TIMEOUT) - before
    assert made == 1  # one for the request, shared by its three tasks
    assert (leaked["request_id"], leaked["baggage"]["leaked"]) == ("leaked", "yes")
    assert after["pid"] == leaked["pid"]
    assert (after["trace_id"], after["span_id"]) == ids
    assert (after["request_id"], after["unregistered"]) == ("req-1", "default")
    assert after["baggage"] == {"user": "alice"}


def test_a_mutable_registered_value_is_each_tasks_own(mp_context: BaseContext) -> None:
    """I2: a registered value that can change (a list) is never shared by two tasks."""
    with propagate.ProcessPoolExecutor(1, mp_context) as pool, \
            setting(REQUEST_ID, ["a"]):  # type: ignore[arg-type]
        seen = [pool.submit(pt.append_to_request, "x").result(timeout=TIMEOUT)
                for _ in range(3)]
    assert seen == [["a", "x"]] * 3
    assert REQUEST_ID.get() == "unset"


def test_a_worker_context_set_by_the_initializer_is_seen_with_the_request(
        mp_context: BaseContext, tracer: trace.Tracer) -> None:
    """I1: where the worker's own context holds something (set by an initializer), each
    task runs in a copy of it, with the request's context entered over it."""
    with propagate.ProcessPoolExecutor(1, mp_context, pt.mark_worker, ("worker",)) as pool, \
            tracer.start_as_current_span("request"), setting(REQUEST_ID, "req-2"):
        ids = current_ids()
        before = pool.submit(pt.templates).result(timeout=TIMEOUT)
        seen = [pool.submit(pt.observe).result(timeout=TIMEOUT) for _ in range(2)]
        assert pool.submit(pt.templates).result(timeout=TIMEOUT) == before  # entered, each
    for one in seen:
        assert (one["request_id"], one["unregistered"]) == ("req-2", "worker")
        assert (one["trace_id"], one["span_id"]) == ids


def test_initializer_and_initargs(mp_context: BaseContext) -> None:
    """I1: positional initializer and initargs run in each worker; tasks still get the context."""
    with propagate.ProcessPoolExecutor(1, mp_context, pt.initialize, ("ready",)) as pool, \
            setting(REQUEST_ID, "req-init"):
        assert pool.submit(pt.initialized).result(timeout=TIMEOUT) == ("ready", "req-init")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is new in 3.11")
def test_max_tasks_per_child(mp_context: BaseContext) -> None:
    """I1: max_tasks_per_child replaces workers as in the stdlib; each new one gets the context."""
    if mp_context.get_start_method() == "fork":
        with pytest.raises(ValueError) as stdlib:
            cf.ProcessPoolExecutor(1, mp_context, max_tasks_per_child=1)
        with pytest.raises(ValueError) as ours:
            propagate.ProcessPoolExecutor(1, mp_context, max_tasks_per_child=1)
        assert str(ours.value) == str(stdlib.value)
        return
    with propagate.ProcessPoolExecutor(1, mp_context, max_tasks_per_child=1) as pool, \
            setting(REQUEST_ID, "req-child"):
        first = pool.submit(pt.observe).result(timeout=TIMEOUT)
        second = pool.submit(pt.observe).result(timeout=TIMEOUT)
    assert first["pid"] != second["pid"]
    assert first["request_id"] == second["request_id"] == "req-child"


# -- I1: what crosses ----------------------------------------------------------------------

def test_worker_span_is_child_of_submitter(pool: propagate.ProcessPoolExecutor,
                                           exporter: InMemorySpanExporter,
                                           tracer: trace.Tracer) -> None:
    """I1: a span started in the worker has the submitter's trace id and span as parent."""
    with tracer.start_as_current_span("submitter") as submitter:
        got = pool.submit(pt.record_spans, "work").result(timeout=TIMEOUT)
    sc = submitter.get_span_context()
    assert got["pid"] != os.getpid()
    [(_, trace_id, span_id, parent_id)] = got["spans"]
    assert (trace_id, parent_id) == (sc.trace_id, sc.span_id)
    work = one_span(exporter, "work")
    assert work.context.span_id == span_id
    assert work.parent is not None and work.parent.is_remote
    assert (work.context.trace_id, work.parent.span_id) == (sc.trace_id, sc.span_id)


def test_baggage_and_registered_vars_cross(pool: propagate.ProcessPoolExecutor,
                                           tracer: trace.Tracer) -> None:
    """I1: the current span, baggage and registered ContextVars cross; unregistered ones do not."""
    with tracer.start_as_current_span("submitter"), with_baggage(user="alice", tenant="t1"), \
            setting(REQUEST_ID, "req-1"), setting(UNREGISTERED, "mine"):
        got = pool.submit(pt.observe).result(timeout=TIMEOUT)
        trace_id, span_id = current_ids()
    assert got["pid"] != os.getpid()
    assert (got["trace_id"], got["span_id"]) == (trace_id, span_id)
    assert got["is_remote"]
    assert got["baggage"] == {"user": "alice", "tenant": "t1"}
    assert got["request_id"] == "req-1"
    assert got["unregistered"] == "default"


def test_no_current_span_crosses_as_none(pool: propagate.ProcessPoolExecutor) -> None:
    """I1: with no current span in the submitter, the task has none either."""
    got = pool.submit(pt.observe).result(timeout=TIMEOUT)
    assert (got["trace_id"], got["span_id"]) == (0, 0)
    assert got["baggage"] == {}
    assert got["request_id"] == "unset"


def test_worker_forked_by_submit_inherits_nothing(mp_context: BaseContext) -> None:
    """I1: a worker started by a submit made under an unregistered value does not see it."""
    with propagate.ProcessPoolExecutor(1, mp_context) as pool, setting(UNREGISTERED, "mine"):
        got = pool.submit(pt.observe).result(timeout=TIMEOUT)
    assert got["unregistered"] == "default"


def test_lambdas_closures_and_local_functions(pool: propagate.ProcessPoolExecutor) -> None:
    """I1: what plain pickle refuses (lambdas, closures, local functions) crosses by cloudpickle."""
    offset = 10

    def add(x: int) -> int:
        return x + offset

    def where() -> int:
        return os.getpid()

    assert pool.submit(lambda x: x + 1, 41).result(timeout=TIMEOUT) == 42
    assert pool.submit(add, 5).result(timeout=TIMEOUT) == 15
    assert pool.submit(where).result(timeout=TIMEOUT) not in (os.getpid(), None)
    with setting(REQUEST_ID, "req-local"):
        assert pool.submit(lambda: (REQUEST_ID.get(), offset)).result(timeout=TIMEOUT) == (
            "req-local", 10)


def test_lambda_reading_registered_var(pool: propagate.ProcessPoolExecutor) -> None:
    """I1: a lambda that refers to a registered ContextVar global sees the submitter's value."""
    with setting(REQUEST_ID, "req-lambda"):
        assert pool.submit(lambda: REQUEST_ID.get()).result(timeout=TIMEOUT) == "req-lambda"


# -- I2: nothing leaks ---------------------------------------------------------------------

def test_task_changes_do_not_leak(pool: propagate.ProcessPoolExecutor,
                                  tracer: trace.Tracer) -> None:
    """I2: what a task sets is seen neither by the submitter nor by the next task on the worker."""
    with tracer.start_as_current_span("submitter"), with_baggage(user="alice"), \
            setting(REQUEST_ID, "outer"):
        before = current_ids()
        leaked = pool.submit(pt.leak).result(timeout=TIMEOUT)
        assert (leaked["request_id"], leaked["unregistered"]) == ("leaked", "leaked")
        assert leaked["baggage"] == {"user": "alice", "leaked": "yes"}
        assert current_ids() == before
        assert dict(baggage.get_all()) == {"user": "alice"}
        assert (REQUEST_ID.get(), UNREGISTERED.get()) == ("outer", "default")
    after = pool.submit(pt.observe).result(timeout=TIMEOUT)
    assert after["pid"] == leaked["pid"]  # the same worker
    assert (after["trace_id"], after["span_id"]) == (0, 0)
    assert after["baggage"] == {}
    assert (after["request_id"], after["unregistered"]) == ("unset", "default")


def test_map_chunk_items_do_not_share_context(pool: propagate.ProcessPoolExecutor) -> None:
    """I2: with map(chunksize > 1) each item starts from the submitter's context, not the last."""
    with with_baggage(user="alice"), setting(REQUEST_ID, "outer"):
        seen = list(pool.map(pt.observe_then_leak, range(4), chunksize=4, timeout=TIMEOUT))
    assert [(s["request_id"], s["unregistered"], s["baggage"]) for s in seen] == [
        ("outer", "default", {"user": "alice"})] * 4


# -- I3: fire and forget -------------------------------------------------------------------

def test_submitter_span_may_end_before_task_runs(pool: propagate.ProcessPoolExecutor,
                                                 exporter: InMemorySpanExporter,
                                                 tracer: trace.Tracer, tmp_path: Path) -> None:
    """I3: the submitter's span ends while the task waits; the task's span still is its child."""
    with held(pool, tmp_path / "gate"):
        with tracer.start_as_current_span("short-lived") as submitter:
            fut = pool.submit(pt.record_spans, "after-end")
        assert submitter.end_time is not None  # type: ignore[attr-defined]
        assert not fut.done()  # the only worker is still held
    fut.result(timeout=TIMEOUT)
    ended = one_span(exporter, "short-lived")
    late = one_span(exporter, "after-end")
    assert late.parent is not None
    assert (late.context.trace_id, late.parent.span_id) == (
        ended.context.trace_id, ended.context.span_id)
    assert ended.end_time is not None and late.start_time is not None
    assert late.start_time >= ended.end_time


# -- I6: the relay -------------------------------------------------------------------------

def test_worker_spans_arrive_once_before_future_resolves(pool: propagate.ProcessPoolExecutor,
                                                         exporter: InMemorySpanExporter,
                                                         tracer: trace.Tracer) -> None:
    """I6: worker spans reach the parent's exporter once, with their parents, before resolution."""
    at_resolution: list[list[str]] = []
    with tracer.start_as_current_span("submitter") as submitter:
        fut = pool.submit(pt.record_spans, "outer", "inner")
        fut.add_done_callback(
            lambda _: at_resolution.append(sorted(s.name for s in exporter.get_finished_spans())))
        got = fut.result(timeout=TIMEOUT)
        assert sorted(s.name for s in exporter.get_finished_spans()) == ["inner", "outer"]
    assert at_resolution == [["inner", "outer"]]
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["inner", "outer", "submitter"]
    assert_unique(exporter)
    outer, inner = one_span(exporter, "outer"), one_span(exporter, "inner")
    sc = submitter.get_span_context()
    assert outer.parent is not None and inner.parent is not None
    assert outer.parent.span_id == sc.span_id
    assert inner.parent.span_id == outer.context.span_id
    assert {outer.context.trace_id, inner.context.trace_id} == {sc.trace_id}
    assert [(n, s) for n, _, s, _ in got["spans"]] == [
        ("outer", outer.context.span_id), ("inner", inner.context.span_id)]
    assert dict(outer.attributes or {}) == {"task.depth": 0}


def test_worker_does_not_export_itself(pool: propagate.ProcessPoolExecutor,
                                       exporter: InMemorySpanExporter) -> None:
    """I6: a worker only relays: even a forked one, with a copy of the exporter, exports nothing."""
    assert pool.submit(pt.exported_here, "relayed-only").result(timeout=TIMEOUT) == 0
    assert [s.name for s in exporter.get_finished_spans()] == ["relayed-only"]


def test_relayed_spans_carry_worker_pid_and_parent_resource(
        pool: propagate.ProcessPoolExecutor, exporter: InMemorySpanExporter) -> None:
    """I6: a relayed span's resource is the parent's, plus the worker's process.pid."""
    got = pool.submit(pt.record_spans, "resourced").result(timeout=TIMEOUT)
    span = one_span(exporter, "resourced")
    attributes = span.resource.attributes
    assert attributes["process.pid"] == got["pid"] != os.getpid()
    parent = trace.get_tracer_provider().resource.attributes  # type: ignore[attr-defined]
    assert "service.name" in parent
    for key, value in parent.items():
        if key not in ("host.name", "process.pid"):  # the worker's own
            assert attributes[key] == value, key


def test_spans_of_failed_task_arrive(pool: propagate.ProcessPoolExecutor,
                                     exporter: InMemorySpanExporter,
                                     tracer: trace.Tracer) -> None:
    """I6: spans recorded before a task raises arrive once, before resolution, leaving no trace."""
    with tracer.start_as_current_span("submitter") as submitter:
        fut = pool.submit(pt.fail_after_span, "doomed")
        with pytest.raises(pt.TaskError) as info:
            fut.result(timeout=TIMEOUT)
        assert [s.name for s in exporter.get_finished_spans()] == ["doomed"]
    doomed = one_span(exporter, "doomed")
    assert doomed.parent is not None
    assert doomed.parent.span_id == submitter.get_span_context().span_id
    assert_unique(exporter)
    assert extra_state(info.value) == {}


def test_user_exception_arrives_unchanged(pool: propagate.ProcessPoolExecutor) -> None:
    """I7: the user's exception keeps its type and args, with the remote traceback as its cause."""
    with pytest.raises(pt.TaskError) as info:
        pool.submit(pt.fail_after_span, "raising").result(timeout=TIMEOUT)
    assert type(info.value) is pt.TaskError
    assert info.value.args == ("boom", 42)
    cause = info.value.__cause__
    assert type(cause).__name__ == "_RemoteTraceback"
    assert "fail_after_span" in str(cause)
    assert extra_state(info.value) == {}
    assert info.value.__traceback__ is not None  # raised here, with the remote one as cause


def test_user_exception_unchanged_when_tblib_pickles_it(mp_context: BaseContext,
                                                         exporter: InMemorySpanExporter) -> None:
    """I7: a failed task's exception is unchanged even where tblib pickles it (Dask installs it)."""
    pytest.importorskip("tblib.pickling_support")
    # A pool of its own: tblib stays installed in its worker.
    with propagate.ProcessPoolExecutor(1, mp_context) as pool, \
            pytest.raises(pt.TblibError) as info:
        pool.submit(pt.fail_pickled_by_tblib, "tblib-doomed").result(timeout=TIMEOUT)
    assert info.value.args == ("boom", 42)
    assert [s.name for s in exporter.get_finished_spans()] == ["tblib-doomed"]
    assert extra_state(info.value) == {}


def test_nothing_lost_when_pool_shuts_down(mp_context: BaseContext,
                                           exporter: InMemorySpanExporter,
                                           tracer: trace.Tracer) -> None:
    """I6: spans of tasks nobody waited on are all home once the pool has shut down right after."""
    with tracer.start_as_current_span("submitter") as submitter, \
            propagate.ProcessPoolExecutor(2, mp_context) as pool:
        futures = [pool.submit(pt.record_spans, f"task-{i}", f"task-{i}-child")
                   for i in range(4)]
    assert all(f.done() for f in futures)
    assert len(relayed(exporter)) == 8
    assert_unique(exporter)
    for i in range(4):
        task, child = one_span(exporter, f"task-{i}"), one_span(exporter, f"task-{i}-child")
        assert task.parent is not None and child.parent is not None
        assert task.parent.span_id == submitter.get_span_context().span_id
        assert child.parent.span_id == task.context.span_id


def test_relay_false_brings_nothing_home(mp_context: BaseContext,
                                         exporter: InMemorySpanExporter,
                                         tracer: trace.Tracer) -> None:
    """I6: with relay=False the context still crosses, but no worker span reaches the parent."""
    with propagate.ProcessPoolExecutor(1, mp_context, relay=False) as pool, \
            tracer.start_as_current_span("submitter"):
        seen = pool.submit(pt.observe).result(timeout=TIMEOUT)
        exported = pool.submit(pt.exported_here, "unrelayed").result(timeout=TIMEOUT)
        assert (seen["trace_id"], seen["span_id"]) == current_ids()
    assert [s.name for s in exporter.get_finished_spans()] == ["submitter"]
    # A forked worker exports to its own inherited copy of the exporter; the others have
    # no tracer provider at all.
    assert exported == (1 if mp_context.get_start_method() == "fork" else 0)


# -- task spans ----------------------------------------------------------------------------

def test_task_span_in_worker(span_pool: propagate.ProcessPoolExecutor,
                             exporter: InMemorySpanExporter, tracer: trace.Tracer) -> None:
    """I6: task_spans names a span after the function, in the worker, under the submitter."""
    with tracer.start_as_current_span("submitter") as submitter:
        got = span_pool.submit(pt.observe).result(timeout=TIMEOUT)
    task = one_span(exporter, "observe")
    assert task.context.span_id == got["span_id"]  # current in the task
    assert task.parent is not None
    assert task.parent.span_id == submitter.get_span_context().span_id
    attributes = task.attributes or {}
    assert attributes["process.pid"] == got["pid"] != os.getpid()
    assert task.resource.attributes["process.pid"] == got["pid"]
    assert attributes["thread.id"] == got["thread_id"]
    assert attributes["thread.name"] == got["thread_name"]
    queued = attributes["propagate.queue_seconds"]
    assert isinstance(queued, float) and queued >= 0


def test_task_span_link(mp_context: BaseContext, exporter: InMemorySpanExporter,
                        tracer: trace.Tracer) -> None:
    """I6: link=True makes the task span the root of a new trace, linked to the submitter's span."""
    with propagate.ProcessPoolExecutor(1, mp_context, task_spans=True, link=True) as pool, \
            tracer.start_as_current_span("submitter") as submitter:
        pool.submit(pt.record_spans, "linked-child").result(timeout=TIMEOUT)
    sc = submitter.get_span_context()
    task, child = one_span(exporter, "record_spans"), one_span(exporter, "linked-child")
    assert task.parent is None
    assert task.context.trace_id != sc.trace_id
    assert [(lk.context.trace_id, lk.context.span_id) for lk in task.links] == [
        (sc.trace_id, sc.span_id)]
    assert child.parent is not None
    assert (child.context.trace_id, child.parent.span_id) == (
        task.context.trace_id, task.context.span_id)


def test_map_task_spans_named_after_function(span_pool: propagate.ProcessPoolExecutor,
                                             exporter: InMemorySpanExporter,
                                             tracer: trace.Tracer) -> None:
    """I6: map's task spans are named after the mapped function, not the stdlib's chunk runner."""
    with tracer.start_as_current_span("submitter") as submitter:
        assert list(span_pool.map(pt.square, [1, 2, 3], timeout=TIMEOUT)) == [1, 4, 9]
    spans = relayed(exporter)
    assert [s.name for s in spans] == ["square"] * 3
    assert {s.parent.span_id for s in spans if s.parent} == {submitter.get_span_context().span_id}
    assert_unique(exporter)


# -- I7: bad input fails where the stdlib fails it ------------------------------------------

def test_unpicklable_registered_value_fails_at_submit(pool: propagate.ProcessPoolExecutor,
                                                      tmp_path: Path) -> None:
    """I7: an unpicklable registered value fails submit, naming the variable, queueing nothing."""
    mark = tmp_path / "ran"
    with setting(REQUEST_ID, threading.Lock()), \
            pytest.raises(propagate.ContextSerializationError) as info:
        pool.submit(pt.touch, str(mark))
    assert REQUEST_ID_NAME in str(info.value)
    assert isinstance(info.value, TypeError)
    # Still usable, and the failed task was not queued before this one.
    assert pool.submit(pt.square, 3).result(timeout=TIMEOUT) == 9
    assert not mark.exists()


@pytest.mark.parametrize("make", [threading.Lock, lambda: (i for i in range(3)),
                                  pt.Unpicklable], ids=["lock", "generator", "refuses"])
def test_unpicklable_argument_fails_on_the_future_as_the_stdlibs(
        pool: propagate.ProcessPoolExecutor, tmp_path: Path, make: Callable[[], object]) -> None:
    """I7: what the stdlib cannot pickle fails where it does: on the future, same exception.

    ``submit`` returns; ``result()`` raises the pickler's own exception (so ``except
    pickle.PicklingError`` still matches), and the task never ran.
    """
    mark = tmp_path / "ran"
    value = make()
    with cf.ProcessPoolExecutor(1, mp_context=pool._mp_context) as stdlib:  # type: ignore[attr-defined]
        expected = stdlib.submit(pt.touch, str(mark), value).exception(timeout=TIMEOUT)
    got = pool.submit(pt.touch, str(mark), value).exception(timeout=TIMEOUT)
    assert expected is not None and got is not None
    assert (type(got), str(got)) == (type(expected), str(expected))
    if isinstance(value, pt.Unpicklable):
        assert isinstance(got, pickle.PicklingError)
    assert pool.submit(pt.square, 4).result(timeout=TIMEOUT) == 16
    assert not mark.exists()


def test_map_raises_after_the_results_before_an_unpicklable_item(
        pool: propagate.ProcessPoolExecutor) -> None:
    """I7: map(f, [1, 2, bad, 4]) yields 1 and 4, then raises, as the stdlib's does."""
    results = pool.map(pt.square, [1, 2, threading.Lock(), 4])
    assert next(results) == 1
    assert next(results) == 4
    with pytest.raises(TypeError, match="lock"):
        next(results)


def test_lambda_capturing_a_lock_names_the_task(pool: propagate.ProcessPoolExecutor) -> None:
    """I7: a lambda nothing can send fails on its future, the note naming the lambda."""
    lock = threading.Lock()
    error = pool.submit(lambda: lock.locked()).exception(timeout=TIMEOUT)
    assert isinstance(error, TypeError) and "lock" in str(error)
    if sys.version_info >= (3, 11):
        assert any("<lambda>" in note for note in error.__notes__)


def test_semaphore_method_fails_on_the_future_not_at_submit(
        pool: propagate.ProcessPoolExecutor) -> None:
    """I7: a multiprocessing Semaphore's method (CPython's test_saturation) submits, as with
    the stdlib; only sending it fails, on its future."""
    sem = pool._mp_context.Semaphore(0)  # type: ignore[attr-defined]
    with cf.ProcessPoolExecutor(1, mp_context=pool._mp_context) as stdlib:  # type: ignore[attr-defined]
        expected = stdlib.submit(sem.acquire).exception(timeout=TIMEOUT)
    error = pool.submit(sem.acquire).exception(timeout=TIMEOUT)
    assert expected is not None and error is not None
    assert (type(error), str(error)) == (type(expected), str(expected))


@pytest.mark.parametrize("how", ["argument", "global"])
def test_unregistered_contextvar_fails_on_the_future(pool: propagate.ProcessPoolExecutor,
                                                     how: str) -> None:
    """I7: an unregistered ContextVar cannot cross, and the error says to register it."""
    if how == "argument":
        future = pool.submit(pt.touch, "/nonexistent/never", UNREGISTERED)
    else:
        future = pool.submit(lambda: UNREGISTERED.get())
    with pytest.raises(TypeError, match=r"propagate\.register"):
        future.result(timeout=TIMEOUT)
    assert pool.submit(pt.square, 5).result(timeout=TIMEOUT) == 25


def test_task_that_cannot_be_unpickled_in_the_worker_breaks_the_pool_as_the_stdlibs(
        mp_context: BaseContext) -> None:
    """I7: what the worker cannot unpickle gives what the stdlib gives: BrokenProcessPool."""
    with propagate.ProcessPoolExecutor(1, mp_context=mp_context) as pool, \
            pytest.raises(BrokenProcessPool):
        pool.submit(pt.touch, "/nonexistent/never", pt.FailsToLoad()).result(timeout=TIMEOUT)


# -- what the stdlib's pickler sends, propagate sends -----------------------------------------

def test_pipe_end_crosses_as_the_stdlib_sends_it(pool: propagate.ProcessPoolExecutor) -> None:
    """API: a multiprocessing Connection crosses through multiprocessing's reducer: a live pipe."""
    mine, theirs = pool._mp_context.Pipe()  # type: ignore[attr-defined]
    with mine, theirs:
        worker = pool.submit(pt.send_on, theirs, {"hello": "parent"}).result(timeout=TIMEOUT)
        assert mine.poll(TIMEOUT)
        assert mine.recv() == {"hello": "parent"}
    assert worker != os.getpid()


def test_socket_crosses_as_the_stdlib_sends_it(pool: propagate.ProcessPoolExecutor) -> None:
    """API: a socket crosses through multiprocessing's reducer, duplicated into the worker."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        assert pool.submit(pt.send_on_socket, theirs, b"ping").result(timeout=TIMEOUT) == 4
        mine.settimeout(TIMEOUT)
        assert mine.recv(4) == b"ping"


def test_registered_reducer_is_used_once_per_send(pool: propagate.ProcessPoolExecutor) -> None:
    """API: a reducer registered with ForkingPickler.register is used, and runs once per send."""
    calls = []

    def reduce_marked(value: pt.Marked) -> tuple[Any, ...]:
        calls.append(value.how)
        return pt.Marked, ("through the registered reducer",)

    ForkingPickler.register(pt.Marked, reduce_marked)
    try:
        got = pool.submit(pt.how_marked, pt.Marked("plain")).result(timeout=TIMEOUT)
    finally:
        ForkingPickler._extra_reducers.pop(pt.Marked, None)  # type: ignore[attr-defined]
    assert got == "through the registered reducer"
    assert calls == ["plain"]


def test_lambda_using_a_module_level_tracer(pool: propagate.ProcessPoolExecutor,
                                            exporter: InMemorySpanExporter,
                                            tracer: trace.Tracer) -> None:
    """I1, I6: the standard idiom: a lambda using ``tracer = trace.get_tracer(__name__)`` is sent,
    the tracer by reference to the worker's own provider, and its span comes home."""
    with tracer.start_as_current_span("submitter"):
        submitter = current_ids()
        pool.submit(lambda: pt.tracer.start_span("from a lambda").end()).result(timeout=TIMEOUT)
    span = one_span(exporter, "from a lambda")
    assert span.parent is not None
    assert (span.context.trace_id, span.parent.span_id) == submitter
    assert span.instrumentation_scope is not None
    assert span.instrumentation_scope.name == "tests.process_tasks"


# -- baggage crosses as strings ----------------------------------------------------------------

class NoString:
    def __str__(self) -> str:
        raise RuntimeError("no string for you")


class AmbiguousEquality:
    """Like a numpy array: ``==`` raises."""

    def __eq__(self, other: object) -> bool:
        raise ValueError("the truth value is ambiguous")

    __hash__ = object.__hash__

    def __str__(self) -> str:
        return "ambiguous"


def test_baggage_crosses_as_strings(pool: propagate.ProcessPoolExecutor) -> None:
    """I1: baggage is strings, as OpenTelemetry carries it: other values cross as ``str(value)``.

    A value whose ``==`` raises crosses too, task after task in one worker.
    """
    with with_baggage(count=3, odd=AmbiguousEquality()):
        first = pool.submit(pt.baggage_value, "count").result(timeout=TIMEOUT)
        second = pool.submit(pt.baggage_value, "odd").result(timeout=TIMEOUT)
        third = pool.submit(pt.baggage_value, "odd").result(timeout=TIMEOUT)
    assert (first, second, third) == ("3", "ambiguous", "ambiguous")


def test_baggage_value_with_no_string_fails_at_submit_naming_the_key(
        pool: propagate.ProcessPoolExecutor) -> None:
    """I7: a baggage value with no string form fails at submit, naming its key."""
    with with_baggage(broken=NoString()), \
            pytest.raises(propagate.ContextSerializationError, match="'broken'"):
        pool.submit(pt.square, 2)


# -- exactly once, through every path -----------------------------------------------------------

def test_exception_object_raised_by_several_tasks_sends_each_span_once(
        pool: propagate.ProcessPoolExecutor, exporter: InMemorySpanExporter) -> None:
    """I6: one cached exception object raised by task after task: each span arrives once.

    Also returned as a value, and raised from ``map``.
    """
    for name in ("one", "two", "three"):
        with pytest.raises(pt.TaskError, match="cached"):
            pool.submit(pt.raise_cached, name).result(timeout=TIMEOUT)
    returned = pool.submit(pt.return_cached, "four").result(timeout=TIMEOUT)
    assert isinstance(returned, pt.TaskError)
    with pytest.raises(pt.TaskError):
        list(pool.map(pt.raise_cached, ["five", "six"]))  # "six" is cancelled if not yet sent
    pool.submit(pt.pid).result(timeout=TIMEOUT)  # one worker, in order: "six" is home if it ran
    names = sorted(s.name for s in relayed(exporter))
    ran = ["five", "four", "one", "three", "two"]
    assert names in (ran, sorted([*ran, "six"])), names
    assert_unique(exporter)


def test_chained_exception_sends_its_spans_once(pool: propagate.ProcessPoolExecutor,
                                                exporter: InMemorySpanExporter) -> None:
    """I6: an exception raised from another arrives as the stdlib sends it, spans once."""
    with pytest.raises(pt.TaskError, match="chained"):
        pool.submit(pt.raise_chained, "chained").result(timeout=TIMEOUT)
    assert [s.name for s in relayed(exporter)] == ["chained"]


def test_result_that_cannot_be_pickled_fails_and_its_spans_arrive(
        pool: propagate.ProcessPoolExecutor, exporter: InMemorySpanExporter) -> None:
    """I6: a result the worker cannot send fails with the pickler's own error, as with the
    stdlib; the task's spans still arrive, once."""
    with pytest.raises(TypeError, match="lock"):
        pool.submit(pt.span_then_make, "kept", "lock").result(timeout=TIMEOUT)
    assert [s.name for s in relayed(exporter)] == ["kept"]


def test_exception_that_cannot_be_pickled_fails_and_its_spans_arrive(
        pool: propagate.ProcessPoolExecutor, exporter: InMemorySpanExporter) -> None:
    """I6: an exception the worker cannot send fails with the pickler's own error, as with
    the stdlib; the task's spans still arrive, once."""
    with pytest.raises(TypeError, match="lock"):
        pool.submit(pt.raise_unpicklable, "kept").result(timeout=TIMEOUT)
    assert [s.name for s in relayed(exporter)] == ["kept"]


def test_result_that_cannot_be_unpickled_breaks_the_pool_and_its_spans_arrive(
        mp_context: BaseContext, exporter: InMemorySpanExporter) -> None:
    """I6: a result the parent cannot unpickle breaks the pool (the stdlib's outcome); the
    spans that rode on it were delivered first, once."""
    with propagate.ProcessPoolExecutor(1, mp_context=mp_context) as pool:
        future = pool.submit(pt.span_then_make, "before", "fails to load")
        with pytest.raises(BrokenProcessPool):
            future.result(timeout=TIMEOUT)
    assert [s.name for s in relayed(exporter)] == ["before"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="max_tasks_per_child is 3.11+")
def test_spans_arrive_once_with_max_tasks_per_child(mp_context: BaseContext,
                                                    exporter: InMemorySpanExporter) -> None:
    """I6: workers replaced after every task lose none of their spans and repeat none."""
    if mp_context.get_start_method() == "fork":
        pytest.skip("max_tasks_per_child refuses the fork start method")
    with propagate.ProcessPoolExecutor(1, mp_context=mp_context, max_tasks_per_child=1) as pool:
        names = [f"task {i}" for i in range(4)]
        assert list(pool.map(pt.span_then_return, names, names)) == names
    assert sorted(s.name for s in relayed(exporter)) == sorted(names)
    assert_unique(exporter)


# -- telemetry trouble never fails a task -------------------------------------------------------

def test_worker_provider_with_its_own_active_processor_runs_tasks(
        mp_context: BaseContext, exporter: InMemorySpanExporter, tracer: trace.Tracer) -> None:
    """I9: a worker whose provider has an active span processor the relay can neither
    replace nor add to (set up by the initializer) still runs every task; its spans stay
    in the worker (one warning there), none arrives twice."""
    with propagate.ProcessPoolExecutor(1, mp_context=mp_context,
                                       initializer=pt.use_opaque_provider) as pool, \
            tracer.start_as_current_span("submitter"):
        assert pool.submit(pt.span_then_return, "inside", 7).result(timeout=TIMEOUT) == 7
        assert pool.submit(pt.span_then_return, "again", 8).result(timeout=TIMEOUT) == 8
    expected = ["again", "inside"] if mp_context.get_start_method() == "fork" else []
    assert sorted(s.name for s in relayed(exporter)) == expected  # fork: the session's provider


# -- I7: faults ----------------------------------------------------------------------------

@pytest.mark.parametrize("die", [pt.exit_now, pt.kill_self], ids=["os._exit", "SIGKILL"])
def test_dead_worker_breaks_pool(mp_context: BaseContext, tracer: trace.Tracer,
                                 die: Callable[[], None]) -> None:
    """I7: a worker dying mid-task gives BrokenProcessPool in bounded time; context intact."""
    with tracer.start_as_current_span("submitter"), with_baggage(user="alice"), \
            setting(REQUEST_ID, "req-dead"):
        before = current_ids()
        with propagate.ProcessPoolExecutor(1, mp_context) as pool:
            fut = pool.submit(die)
            with pytest.raises(BrokenProcessPool):
                fut.result(timeout=TIMEOUT)
            with pytest.raises(BrokenProcessPool):
                pool.submit(pt.square, 2)
        assert current_ids() == before
        assert dict(baggage.get_all()) == {"user": "alice"}
        assert REQUEST_ID.get() == "req-dead"


def test_worker_killed_while_logging(mp_context: BaseContext,
                                     exporter: InMemorySpanExporter) -> None:
    """I7: a worker killed in the middle of logging (holding logging's lock) breaks the pool
    in bounded time, as the stdlib's; spans already home stay, once; the dying task's
    span never arrives half-made."""
    with propagate.ProcessPoolExecutor(1, mp_context) as pool:
        assert pool.submit(pt.span_then_return, "before", 1).result(timeout=TIMEOUT) == 1
        with pytest.raises(BrokenProcessPool):
            pool.submit(pt.log_then_die, "unused").result(timeout=TIMEOUT)
    assert [s.name for s in relayed(exporter)] == ["before"]


def test_shutdown_while_results_are_in_flight(mp_context: BaseContext,
                                              exporter: InMemorySpanExporter) -> None:
    """I6: shutdown(wait=False, cancel_futures=True) with results on their way: what ran
    resolves, with its spans home once each; what was cancelled sends none."""
    pool = propagate.ProcessPoolExecutor(2, mp_context)
    names = [f"flight-{i}" for i in range(12)]
    futures = [pool.submit(pt.sleep_then, name, 0.05) for name in names]
    wait_running(futures[0])
    pool.shutdown(wait=False, cancel_futures=True)
    wait_done(futures)
    pool.shutdown(wait=True)
    ran = sorted(f.result() for f in futures if not f.cancelled())
    assert ran, "the first task was running: it must have finished"
    assert sorted(s.name for s in relayed(exporter)) == ran
    assert_unique(exporter)


def test_keyboard_interrupt_in_the_parent_while_tasks_run(
        mp_context: BaseContext, exporter: InMemorySpanExporter) -> None:
    """I7: Ctrl-C in the parent while it waits on tasks: the KeyboardInterrupt reaches the
    caller, as with the stdlib; leaving the ``with`` block waits for the running tasks, and
    every span of a task that finished is home, once."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    futures: list[cf.Future[Any]] = []
    try:
        with pytest.raises(KeyboardInterrupt), \
                propagate.ProcessPoolExecutor(2, mp_context) as pool:
            futures += [pool.submit(pt.sleep_then, f"ctrl-c-{i}", 0.2) for i in range(6)]
            interrupt.start()
            futures[-1].result(timeout=TIMEOUT)
            time.sleep(TIMEOUT)  # the interrupt comes before this ends
    finally:
        interrupt.cancel()
        signal.signal(signal.SIGINT, previous)
    assert all(f.done() for f in futures)  # the with block's shutdown waited for them
    finished = sorted(f.result() for f in futures if not f.cancelled())
    assert sorted(s.name for s in relayed(exporter)) == finished
    assert_unique(exporter)


# -- cancellation, as the stdlib -----------------------------------------------------------

def test_cancel_queued_future(pool: propagate.ProcessPoolExecutor, tmp_path: Path) -> None:
    """API: a queued future cancels and never runs, a running one cannot: as in the stdlib."""
    mark = tmp_path / "ran"
    with held(pool, tmp_path / "gate") as blocker:
        # The call queue holds max_workers + 1 items: the fourth submit is surely still pending.
        fillers = [pool.submit(pt.square, i) for i in range(3)]
        target = pool.submit(pt.touch, str(mark))
        assert target.cancel()
        wait_running(blocker)
        assert not blocker.cancel()
    assert [f.result(timeout=TIMEOUT) for f in fillers] == [0, 1, 4]
    assert target.cancelled()
    with pytest.raises(cf.CancelledError):
        target.result(timeout=TIMEOUT)
    assert pool.submit(pt.square, 6).result(timeout=TIMEOUT) == 36  # after the cancelled one's turn
    assert not mark.exists()


def test_shutdown_cancel_futures(mp_context: BaseContext, tmp_path: Path) -> None:
    """API: shutdown(cancel_futures=True) cancels what has not started, as in the stdlib."""
    mark = tmp_path / "ran"
    gate = tmp_path / "gate"
    with propagate.ProcessPoolExecutor(1, mp_context) as pool:
        blocker = pool.submit(pt.wait_for, str(gate), "released")
        try:
            wait_running(blocker)  # or the shutdown would cancel the blocker as well
            fillers = [pool.submit(pt.square, i) for i in range(3)]
            target = pool.submit(pt.touch, str(mark))
            pool.shutdown(wait=False, cancel_futures=True)
            # The pool's manager thread cancels; wait for it while the worker is held,
            # as the ``with`` exit's shutdown() would turn cancel_futures off again.
            wait_done([target])
        finally:
            gate.touch()
        with pytest.raises(RuntimeError, match="after shutdown"):
            pool.submit(pt.square, 1)
    wait_done([blocker, *fillers])  # shutdown(wait=False) let go of the manager thread
    assert blocker.result() == "released"
    assert target.cancelled()
    for i, fut in enumerate(fillers):
        assert fut.cancelled() or fut.result() == i * i
    assert fillers[-1].cancelled()  # the call queue holds two: the third filler waited
    assert not mark.exists()
