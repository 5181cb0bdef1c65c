"""propagate/ray.py: Ray tasks through an Executor, on a real local Ray cluster.

One Ray instance (two CPUs) serves the module. The task functions live in
`tests.engine_tasks` and `tests.ray_tasks`, which Ray's workers import by name (they
start in this directory).
Ray publishes no wheels for Python 3.15: there the module is skipped, saying so.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import baggage
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import propagate
import propagate.ray
from tests import engine_tasks as et
from tests import ray_tasks as rt
from tests.helpers import (
    assert_freed,
    current_ids,
    extra_state,
    one_span,
    setting,
    spans_named,
    with_baggage,
)

# Neither propagate.ray nor the task module imports Ray: this is the module's first import.
ray = pytest.importorskip("ray", reason=(
    "Ray is not installed (the test extra installs it below Python 3.15: Ray publishes no "
    "wheels for 3.15 yet)"))

WAIT = 60  # seconds: generous, Ray starts worker processes slowly on a busy machine


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """A local Ray instance for the module: two CPUs, a custom resource, no dashboard."""
    ray.init(num_cpus=2, resources={"tests.slot": 1}, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def executor() -> Iterator[cf.Executor]:
    with propagate.ray.executor() as made:
        yield made


def own_worker(tag: str, **options: Any) -> cf.Executor:
    """An executor whose tasks run in a worker of their own: Ray starts one per runtime env."""
    return propagate.ray.executor(runtime_env={"env_vars": {"TESTS_RAY_WORKER": tag}},
                                  **options)


def exported_at_resolve(future: cf.Future[Any], exporter: InMemorySpanExporter) -> list[Any]:
    """Fill a list, from the future's done callback, with the span names exported by then.

    Each entry is (thread id, names): a thread other than the test's shows the callback
    ran when Ray resolved the future, not when it was added to a future already done.
    """
    seen: list[Any] = []
    future.add_done_callback(lambda f: seen.append(
        (threading.get_ident(), [s.name for s in exporter.get_finished_spans()])))
    return seen


def relayed(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    """The exported spans that were recorded in another process."""
    return [s for s in exporter.get_finished_spans()
            if s.resource.attributes.get("process.pid", os.getpid()) != os.getpid()]


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), path


# -- I1, I2, I3: what crosses, what does not ---------------------------------------------------


def test_worker_spans_come_home_under_the_request_span(executor, exporter, tracer,
                                                       tmp_path: Path):
    """I1, I3, I6: a worker's span is a child of the request span, which ended before the
    task ran, and arrives once, with the worker's host.name and process.pid."""
    gate = tmp_path / "gate"
    with tracer.start_as_current_span("request") as request:
        future = executor.submit(et.record, "in worker", str(gate))
    gate.touch()  # the request span has ended: the task records its span only now
    seen = future.result(timeout=WAIT)
    sc = request.get_span_context()
    span = one_span(exporter, "in worker")
    assert span.parent is not None and span.parent.is_remote
    assert (span.parent.trace_id, span.parent.span_id) == (sc.trace_id, sc.span_id)
    assert span.context.trace_id == seen["trace_id"] == sc.trace_id
    assert span.resource.attributes["process.pid"] == seen["pid"] != os.getpid()
    assert span.resource.attributes["host.name"] == seen["host"] == socket.gethostname()
    assert span.resource.attributes["service.name"] == one_span(
        exporter, "request").resource.attributes["service.name"]


def test_baggage_crosses(executor, tracer):
    """I1: the submitter's baggage is the task's baggage in the Ray worker."""
    with tracer.start_as_current_span("request"), with_baggage(tenant="acme", region="eu"):
        seen = executor.submit(et.seen).result(timeout=WAIT)
    assert seen["baggage"] == {"tenant": "acme", "region": "eu"}
    assert seen["span_valid"]


def test_registered_contextvar_crosses_unregistered_does_not(executor):
    """I1: a registered ContextVar's value reaches the worker; an unregistered one does not."""
    with setting(et.REQUEST_ID, "req-7"), setting(et.UNREGISTERED, "driver"):
        seen = executor.submit(et.seen).result(timeout=WAIT)
    assert seen["request_id"] == "req-7"
    assert seen["unregistered"] == "worker"
    assert not seen["span_valid"]  # no current span here: none appears there


def test_closure_reading_a_registered_contextvar(executor):
    """I1: a closure that refers to a registered ContextVar crosses (by value) and reads
    the submitter's value there: Ray's own pickler cannot send the variable."""
    local: ContextVar[str] = propagate.register(ContextVar("tests.ray.closure_local"))
    with setting(local, "from-driver"), setting(et.REQUEST_ID, "req-closure"):
        got = executor.submit(lambda: (local.get(), et.REQUEST_ID.get())).result(timeout=WAIT)
    assert got == ("from-driver", "req-closure")


def test_changes_in_a_task_do_not_leak(tracer):
    """I2: what a task sets in a worker reaches neither the submitter nor the next task there."""
    with own_worker("i2") as executor:
        with tracer.start_as_current_span("request"), setting(et.REQUEST_ID, "req-1"):
            before = current_ids()
            changed = executor.submit(et.change_context, "changed").result(timeout=WAIT)
            assert changed["request_id"] == "req-1"
            assert et.REQUEST_ID.get() == "req-1" and current_ids() == before
            assert dict(baggage.get_all()) == {}
        after = executor.submit(et.seen).result(timeout=WAIT)
    assert after["pid"] == changed["pid"]  # the same worker process
    assert (after["baggage"], after["request_id"], after["unregistered"], after["span_valid"]) == (
        {}, None, "worker", False)


# -- I6: the relay -------------------------------------------------------------------------


def test_spans_arrive_once_before_each_future_resolves(executor, exporter, tracer,
                                                      tmp_path: Path):
    """I6: each worker span reaches this provider exactly once, before its future resolves,
    which Ray resolves on a thread of its own."""
    gate = tmp_path / "gate"
    with tracer.start_as_current_span("request") as request:
        futures = [executor.submit(et.record, f"task-{i}", str(gate)) for i in range(6)]
        checks = [exported_at_resolve(f, exporter) for f in futures]
        gate.touch()  # the tasks end only now: each check sees its future resolve
        results = [f.result(timeout=WAIT) for f in futures]
    for i, (result, check) in enumerate(zip(results, checks, strict=True)):
        [(thread, names)] = check
        assert thread != threading.get_ident()
        assert f"task-{i}" in names
        span = one_span(exporter, f"task-{i}")
        assert span.resource.attributes["process.pid"] == result["pid"]
        assert span.parent is not None
        assert span.parent.span_id == request.get_span_context().span_id


def test_a_result_read_again_is_the_bare_value_and_delivers_nothing(executor, exporter):
    """I6: the task's ObjectRef read again (ray.get here, or handed to another task) gives
    the user's value, not a wrapper, and brings no span home a second time."""
    future = executor.submit(et.record, "read again")
    result = future.result(timeout=WAIT)
    assert ray.get(future.object_ref, timeout=WAIT) == result
    plain = ray.remote(et.identity)
    assert ray.get(plain.remote(future.object_ref), timeout=WAIT) == result  # in a worker
    assert executor.submit(rt.read, [future.object_ref]).result(timeout=WAIT) == result
    assert executor.submit(et.identity, future.object_ref).result(timeout=WAIT) == result
    assert len(spans_named(exporter, "read again")) == 1


def test_spans_of_a_failed_task_arrive_once(executor, exporter, tracer, tmp_path: Path):
    """I6: spans recorded before a task raises ride home on its exception, once (Ray pickles
    the exception twice), before the future resolves, with the error status."""
    gate = tmp_path / "gate"
    with tracer.start_as_current_span("request"):
        future = executor.submit(et.fail, "failing", "boom", str(gate))
        check = exported_at_resolve(future, exporter)
        gate.touch()
        with pytest.raises(et.TaskFailed):
            future.result(timeout=WAIT)
    [(thread, names)] = check
    assert thread != threading.get_ident() and "failing" in names
    span = one_span(exporter, "failing")
    assert span.status.status_code is StatusCode.ERROR
    assert span.resource.attributes["process.pid"] != os.getpid()
    with pytest.raises(ray.exceptions.RayTaskError):  # read again: no second delivery
        ray.get(future.object_ref, timeout=WAIT)
    assert len(spans_named(exporter, "failing")) == 1


def test_spans_ride_on_an_exception_with_its_own_reduce(executor, exporter):
    """I6: an exception class with its own __reduce__ (no __dict__ in its state) still
    brings its task's spans home, once."""
    with pytest.raises(rt.Opaque):
        executor.submit(rt.fail_opaquely, "opaque").result(timeout=WAIT)
    assert [s.name for s in relayed(exporter)] == ["opaque"]


def test_task_spans_and_link(exporter, tracer):
    """I6: task_spans=True records a span per task in the worker, under the request span;
    link=True roots it in a new trace, linked to the submitter."""
    with tracer.start_as_current_span("request") as request:
        seen = propagate.ray.executor(task_spans=True).submit(et.record, "inner").result(
            timeout=WAIT)
        propagate.ray.executor(link=True).submit(et.identity, 1).result(timeout=WAIT)
    sc = request.get_span_context()
    task_span, linked = spans_named(exporter, "record"), one_span(exporter, "identity")
    assert [s.parent.span_id for s in task_span if s.parent] == [sc.span_id]
    assert task_span[0].attributes is not None
    assert task_span[0].attributes["process.pid"] == seen["pid"]
    assert one_span(exporter, "inner").parent.span_id == task_span[0].context.span_id
    assert linked.parent is None and linked.context.trace_id != sc.trace_id
    assert [(lk.context.trace_id, lk.context.span_id) for lk in linked.links] == [
        (sc.trace_id, sc.span_id)]


def test_relay_false_leaves_the_workers_tracing_alone(exporter, tracer):
    """I6: with relay=False the worker's tracer provider is not taken over and no span
    comes home; the context still crosses."""
    with own_worker("no-relay", relay=False) as executor, \
            tracer.start_as_current_span("request"), setting(et.REQUEST_ID, "req-5"):
        seen = executor.submit(et.record, "stays").result(timeout=WAIT)
        processors = executor.submit(et.span_processors).result(timeout=WAIT)
    assert seen["request_id"] == "req-5"
    assert processors == []  # Ray's worker has no SDK provider, and got none from us
    assert spans_named(exporter, "stays") == []


# -- Ray's own behaviour, kept ------------------------------------------------------------------


def test_object_ref_arguments_are_resolved_as_by_ray(executor):
    """API: top-level ObjectRef arguments (positional or keyword) arrive resolved, as with
    plain Ray tasks; one nested in a list arrives as a reference."""
    assert executor.submit(rt.total, ray.put([1, 2, 3]), scale=ray.put(2)).result(
        timeout=WAIT) == 12
    kinds = executor.submit(rt.kinds, ray.put(1), [ray.put(2)], key=ray.put(3)).result(
        timeout=WAIT)
    assert kinds == {"0": "int", "1": "list", "key": "int"}
    upstream = executor.submit(et.identity, [4, 5])
    assert executor.submit(rt.total, upstream.object_ref).result(timeout=WAIT) == 9


def test_an_out_of_band_buffer_arrives_zero_copy_as_with_ray(executor):
    """API: an argument that pickles its buffer out of band (as a NumPy array does) reaches
    the task as a read-only view of Ray's object store, as with a plain Ray task."""
    frame = rt.Frame(bytearray(1 << 20))
    plain = ray.get(ray.remote(rt.received).remote(frame), timeout=WAIT)
    assert executor.submit(rt.received, frame).result(timeout=WAIT) == plain
    assert plain["readonly"] and plain["size"] == 1 << 20


def test_arguments_of_any_name_and_kind_arrive(executor):
    """API: plain and other arguments, small and big, positional and keyword (of any name,
    ``sealed`` too), reach the function as given."""
    assert executor.submit(rt.kinds, 1, "two", [3], sealed=b"4").result(timeout=WAIT) == {
        "0": "int", "1": "str", "2": "list", "sealed": "bytes"}
    assert executor.submit(rt.kinds, 1, rt.Frame(b"2"), sealed=ray.put(3)).result(
        timeout=WAIT) == {"0": "int", "1": "Frame", "sealed": "int"}
    assert executor.submit(len, b"x" * (1 << 20)).result(timeout=WAIT) == 1 << 20


def test_remote_options_reach_ray():
    """API: the keyword arguments are Ray's task options: resources= books that resource."""
    with propagate.ray.executor(num_cpus=0, resources={"tests.slot": 1}) as executor:
        assigned = executor.submit(rt.assigned_resources).result(timeout=WAIT)
    assert assigned == {"tests.slot": 1.0}


def test_map_goes_through_submit(executor, exporter, tracer):
    """API: Executor.map runs each item as a task, in order, with its spans home."""
    with tracer.start_as_current_span("request"):
        seen = list(executor.map(et.record, ["a", "b", "c"], timeout=WAIT))
    assert [s["span_id"] for s in seen] == [one_span(exporter, n).context.span_id
                                            for n in "abc"]


def test_wrap_executor_returns_it_as_it_is(executor):
    """API: the executor binds its own tasks: wrap_executor gives it back unchanged."""
    assert propagate.wrap_executor(executor) is executor
    assert "propagate.ray.executor(" in repr(executor)


# -- I7: bad input and faults ------------------------------------------------------------------


def test_user_exception_reaches_the_caller_unchanged(executor):
    """I7: the task's exception arrives with its own type (not Ray's RayTaskError), args
    and state, with the worker's traceback as its cause, as from a process pool."""
    with pytest.raises(et.TaskFailed) as info:
        executor.submit(et.fail, "raising", "boom").result(timeout=WAIT)
    assert type(info.value) is et.TaskFailed
    assert info.value.args == ("boom", 42)
    assert extra_state(info.value) == {}
    cause = info.value.__cause__
    assert type(cause).__name__ == "_RemoteTraceback"
    assert 'in fail\n    raise TaskFailed(message, 42)' in str(cause)
    assert "\x1b[" not in str(cause)
    assert info.value.__traceback__ is not None  # raised here, the worker's as its cause


def test_not_initialised_fails_clearly(monkeypatch):
    """I7: without ray.init() an executor is refused, saying so, and its tasks too (Ray
    would otherwise start a local instance of its own)."""
    made = propagate.ray.executor()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match=r"call ray\.init\(\) first"):
        propagate.ray.executor()
    with pytest.raises(RuntimeError, match=r"call ray\.init\(\) first"):
        made.submit(et.identity, 1)


def test_bad_options_fail_at_construction():
    """I7: an option Ray does not know, a bad propagate option, or num_returns other than
    1 fails when the executor is made."""
    with pytest.raises(ValueError, match="num_returns must be 1"):
        propagate.ray.executor(num_returns=2)
    with pytest.raises(ValueError, match="bogus"):
        propagate.ray.executor(bogus=1)
    with pytest.raises(TypeError, match="task_spans must be True or False"):
        propagate.ray.executor(task_spans="yes")  # type: ignore[arg-type]


def test_unpicklable_registered_value_fails_at_submit(executor):
    """I7: a registered ContextVar holding what cannot be pickled fails at submit, naming it."""
    with setting(et.REQUEST_ID, threading.Lock()), \
            pytest.raises(propagate.ContextSerializationError, match=r"tests\.engines\.request_id"):
        executor.submit(et.seen)


@pytest.mark.parametrize("die", [rt.exit_now, rt.kill_self], ids=["os._exit", "SIGKILL"])
def test_worker_dying_mid_task_fails_in_bounded_time(die, tracer):
    """I7: a task whose worker dies fails with Ray's WorkerCrashedError in bounded time;
    the submitter's context is intact."""
    with tracer.start_as_current_span("request"), setting(et.REQUEST_ID, "req-dead"):
        before = current_ids()
        started = time.monotonic()
        future = propagate.ray.executor(max_retries=0).submit(die, "dying")
        with pytest.raises(ray.exceptions.WorkerCrashedError, match="worker died"):
            future.result(timeout=WAIT)
        assert time.monotonic() - started < WAIT
        assert current_ids() == before and et.REQUEST_ID.get() == "req-dead"


def test_retry_after_a_dead_worker_brings_the_retrys_spans_once(exporter, tracer,
                                                                 tmp_path: Path):
    """I6, I7: with max_retries, a task whose first worker died is retried; the retry's
    spans arrive once, the dead attempt's are lost with its process."""
    executor = propagate.ray.executor(max_retries=1)
    with tracer.start_as_current_span("request"):
        pid = executor.submit(rt.first_attempt_dies, str(tmp_path / "died"), "retried").result(
            timeout=WAIT)
    span = one_span(exporter, "retried surviving")
    assert span.resource.attributes["process.pid"] == pid
    assert spans_named(exporter, "retried dying") == []


def test_retried_exception_brings_the_last_attempts_spans_once(exporter, tracer,
                                                               tmp_path: Path):
    """I6: with retry_exceptions, only the attempt whose outcome reaches the caller brings
    its spans home, once."""
    executor = propagate.ray.executor(max_retries=1, retry_exceptions=True)
    with tracer.start_as_current_span("request"):
        executor.submit(rt.first_attempt_raises, str(tmp_path / "raised"), "retried").result(
            timeout=WAIT)
    assert [s.name for s in relayed(exporter)] == ["retried returning"]


# -- I5, and shutdown -------------------------------------------------------------------------


class Task:
    """A callable object, to watch for with a weak reference."""

    def __call__(self) -> int:
        return os.getpid()


def test_nothing_is_held_after_a_task(executor):
    """I5: once its future resolved, nothing propagate holds refers to the task."""
    task = Task()
    ref = weakref.ref(task)
    future = executor.submit(task)
    future.result(timeout=WAIT)
    del task
    assert_freed(ref)
    assert propagate.ray._expected == set()


def test_shutdown_waits_for_every_task(tmp_path: Path):
    """API: shutdown() waits until every task has ended; submit afterwards is refused."""
    executor = propagate.ray.executor()
    futures = [executor.submit(time.sleep, 0.3) for _ in range(3)]
    executor.shutdown()
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(et.identity, 1)


def test_cancelled_future_never_runs(tmp_path: Path):
    """API: cancelling the future of a task that has not started cancels the Ray task."""
    started, gate, mark = tmp_path / "started", tmp_path / "gate", tmp_path / "ran"
    with propagate.ray.executor(num_cpus=2) as executor:  # one task at a time on two CPUs
        blocker = executor.submit(rt.hold, str(started), str(gate))
        try:
            wait_for_file(started)
            target = executor.submit(rt.touch, str(mark))
            assert target.cancel()
        finally:
            gate.touch()
        assert blocker.result(timeout=WAIT)
        executor.submit(et.identity, 0).result(timeout=WAIT)  # after the target's turn
    assert target.cancelled()
    assert not mark.exists()


def test_shutdown_cancel_futures(tmp_path: Path):
    """API: shutdown(cancel_futures=True) cancels what has not finished: a pending task never
    runs, a running one is interrupted (Ray cannot tell them apart); wait=True returns once
    Ray has ended both."""
    started, gate, mark = tmp_path / "started", tmp_path / "gate", tmp_path / "ran"
    executor = propagate.ray.executor(num_cpus=2)
    blocker = executor.submit(rt.hold, str(started), str(gate))
    try:
        wait_for_file(started)
        target = executor.submit(rt.touch, str(mark))
        executor.shutdown(wait=True, cancel_futures=True)
    finally:
        gate.touch()
    assert blocker.cancelled() and target.cancelled()
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(target.object_ref, timeout=WAIT)
    assert not mark.exists()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(et.identity, 1)
