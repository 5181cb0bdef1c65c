"""propagate/dask.py and wrap_executor on Dask: a real LocalCluster with worker processes.

The task functions live in `tests.engine_tasks` (those every engine's tests use) and
`tests.dask_tasks`, which the workers import by name. The
workers are spawned by Dask's nannies and configured by nothing but the tasks they run:
whatever the relay needs there is set up by the first task.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import distributed
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import propagate
import propagate.dask
from propagate.debug import ContextFilter
from tests import dask_tasks
from tests import engine_tasks as et
from tests.helpers import extra_state, one_span, setting, spans_named, with_baggage

WAIT = 60  # seconds: generous, worker processes start slowly on a busy machine
WORKERS = 2


def local_cluster(n_workers: int, threads_per_worker: int, processes: bool = True,
                  **worker_kwargs: Any) -> distributed.LocalCluster:
    """Workers on this machine, with no dashboard and no fixed port."""
    # The scheduler's HTTP server (/health, /metrics) listens even without a dashboard,
    # on port 8787 by default: when that is taken (another cluster, another test run) Dask
    # warns and retries, which this test run turns into an error.
    return distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=threads_per_worker, processes=processes,
        dashboard_address=None, scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        **worker_kwargs)


@pytest.fixture(scope="module")
def cluster_client() -> Iterator[distributed.Client]:
    """Two single-threaded worker processes; a task whose workers die fails after two tries."""
    # The scheduler (in this process) reads allowed-failures when it is created: one retry
    # keeps the dying-worker test bounded while still showing Dask's retry on another worker.
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = local_cluster(WORKERS, threads_per_worker=1)
        try:
            with distributed.Client(cluster) as client:
                yield client
        finally:
            # LocalCluster.close() can raise KeyError for a worker the scheduler already
            # removed (the dying-worker test): a Dask teardown race, not ours to test.
            with contextlib.suppress(KeyError):
                cluster.close()


@pytest.fixture
def client(cluster_client: distributed.Client) -> distributed.Client:
    """The module's client, with every worker up (a test may have killed some)."""
    cluster_client.wait_for_workers(WORKERS, timeout=WAIT)
    return cluster_client


@pytest.fixture
def executor(client: distributed.Client) -> cf.Executor:
    """``propagate.wrap_executor(client.get_executor())``: the form the issue asks for."""
    return propagate.wrap_executor(client.get_executor())


def exported_at_resolve(future: cf.Future[Any], exporter: InMemorySpanExporter) -> list[Any]:
    """Fill a list, from the future's done callback, with the span names exported by then.

    Each entry is (thread id, names); a thread other than the test's shows the callback
    ran when Dask resolved the future, not when it was added to an already-done future.
    """
    seen: list[Any] = []
    future.add_done_callback(lambda f: seen.append(
        (threading.get_ident(), [s.name for s in exporter.get_finished_spans()])))
    return seen


def pinned(client: distributed.Client, worker: str) -> cf.Executor:
    """A wrapped executor whose tasks all run on ``worker``."""
    return propagate.wrap_executor(client.get_executor(workers=[worker]))


def worker_addresses(client: distributed.Client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def test_worker_span_is_child_of_client_span(executor, exporter, tracer):
    """I1, I3: a span recorded on a worker is a child of the submitting span, in its trace."""
    with tracer.start_as_current_span("client") as parent:
        future = executor.submit(et.record, "on-worker")
    seen = future.result(timeout=WAIT)  # the client span has ended: the task still has its parent
    sc = parent.get_span_context()
    assert seen["pid"] != os.getpid()
    assert seen["trace_id"] == sc.trace_id
    span = one_span(exporter, "on-worker")
    assert span.parent is not None
    assert (span.parent.trace_id, span.parent.span_id) == (sc.trace_id, sc.span_id)
    assert span.context.trace_id == sc.trace_id


def test_baggage_crosses(executor, tracer):
    """I1: the submitter's baggage is the task's baggage on the worker."""
    with tracer.start_as_current_span("client"), with_baggage(tenant="acme", region="eu"):
        seen = executor.submit(et.seen).result(timeout=WAIT)
    assert seen["baggage"] == {"tenant": "acme", "region": "eu"}
    assert seen["span_valid"]


def test_registered_contextvar_crosses_unregistered_does_not(executor):
    """I1: a registered ContextVar's value reaches the worker; an unregistered one does not."""
    with setting(et.REQUEST_ID, "req-7"), setting(et.UNREGISTERED, "client"):
        seen = executor.submit(et.seen).result(timeout=WAIT)
    assert seen["request_id"] == "req-7"
    assert seen["unregistered"] == "worker"
    assert not seen["span_valid"]  # no current span here: none appears there


def test_changes_on_worker_do_not_leak(client):
    """I2: what a task sets on a worker reaches neither the submitter nor the next task there."""
    executor = pinned(client, worker_addresses(client)[0])
    with setting(et.REQUEST_ID, "req-1"):
        before = executor.submit(et.change_context, "changed").result(timeout=WAIT)
        assert before["request_id"] == "req-1"
        assert et.REQUEST_ID.get() == "req-1"
    after = executor.submit(et.seen).result(timeout=WAIT)
    assert after["pid"] == before["pid"]  # the same worker process
    assert (after["baggage"], after["request_id"], after["unregistered"], after["span_valid"]) == (
        {}, None, "worker", False)


def test_relay_delivers_worker_spans_once_before_future_resolves(client, executor, exporter,
                                                                  tracer):
    """I6: each worker span reaches this provider exactly once, before its future resolves."""
    with tracer.start_as_current_span("client") as parent:
        futures = [executor.submit(et.record, f"task-{i}") for i in range(6)]
        checks = [exported_at_resolve(f, exporter) for f in futures]
        results = [f.result(timeout=WAIT) for f in futures]
    for i, (result, check) in enumerate(zip(results, checks, strict=True)):
        [(thread, names)] = check
        assert thread != threading.get_ident()
        assert f"task-{i}" in names
        span = one_span(exporter, f"task-{i}")
        assert span.resource.attributes["process.pid"] == result["pid"] != os.getpid()
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id


def test_workers_export_nothing_themselves(client, exporter, tracer):
    """I6: after a first task, each worker records into the relay alone; the client exports."""
    with tracer.start_as_current_span("client"):
        for worker in worker_addresses(client):
            pinned(client, worker).submit(et.record, worker).result(timeout=WAIT)
    processors = client.run(et.span_processors)
    assert processors == {w: ["_Collector"] for w in worker_addresses(client)}
    assert sorted(s.name for s in exporter.get_finished_spans()) == sorted(
        [*worker_addresses(client), "client"])


def test_one_trace_from_client_to_workers(client, exporter, tracer):
    """I6: one trace joins a client span to task spans and user spans on worker processes."""
    executor = propagate.dask.executor(client, task_spans=True)
    with tracer.start_as_current_span("request") as root:
        results = list(executor.map(et.record, ["a", "b", "c", "d"], timeout=WAIT))
    trace_id = root.get_span_context().trace_id
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {trace_id}
    task_spans = spans_named(exporter, "record")
    assert len(task_spans) == 4
    by_id = {s.context.span_id: s for s in spans}
    for result, name in zip(results, "abcd", strict=True):
        span = one_span(exporter, name)
        assert span.parent is not None
        task_span = by_id[span.parent.span_id]
        assert task_span.name == "record"
        assert task_span.attributes is not None
        assert task_span.attributes["process.pid"] == result["pid"] != os.getpid()
        assert task_span.parent is not None
        assert task_span.parent.span_id == root.get_span_context().span_id


def test_helper_passes_keywords_to_get_executor(client):
    """API: the helper is get_executor with its keywords: workers= sends each task there."""
    worker = worker_addresses(client)[-1]
    executor = propagate.dask.executor(client, workers=[worker])
    with setting(et.REQUEST_ID, "req-3"):
        seen = list(executor.map(et.record, ["x", "y", "z"], timeout=WAIT))
    assert {s["pid"] for s in seen} == {client.run(os.getpid, workers=[worker])[worker]}
    assert {s["request_id"] for s in seen} == {"req-3"}


def test_link_starts_a_new_trace(client, exporter, tracer):
    """I6: with link=True the worker's task span roots a new trace, linked to the submitter."""
    executor = propagate.dask.executor(client, task_spans=True, link=True)
    with tracer.start_as_current_span("submitter") as parent:
        executor.submit(et.identity, 1).result(timeout=WAIT)
    task_span = one_span(exporter, "identity")
    sc = parent.get_span_context()
    assert task_span.parent is None
    assert task_span.context.trace_id != sc.trace_id
    assert [(lk.context.trace_id, lk.context.span_id) for lk in task_span.links] == [
        (sc.trace_id, sc.span_id)]


def test_exception_on_worker_reaches_caller(executor, exporter, tracer):
    """I7: a worker's exception reaches the caller with its type, args and remote traceback."""
    with tracer.start_as_current_span("client"):
        future = executor.submit(et.fail, "failing", "boom")
        check = exported_at_resolve(future, exporter)
        with pytest.raises(et.TaskFailed) as info:
            future.result(timeout=WAIT)
    assert type(info.value) is et.TaskFailed
    assert info.value.args == ("boom", 42)
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "fail" in frames
    [(thread, names)] = check
    assert thread != threading.get_ident() and "failing" in names
    span = one_span(exporter, "failing")
    assert span.status.status_code is StatusCode.ERROR
    assert span.resource.attributes["process.pid"] != os.getpid()


def test_the_first_exception_of_its_type_a_worker_reports_arrives_unchanged(executor, exporter,
                                                                              tracer):
    """I6, I7: Dask registers tblib's reducer for an exception's type as a worker reports
    the first one, after the task ended: its spans still come home once, and nothing of
    propagate's is left on the caller's exception."""
    with tracer.start_as_current_span("client"):
        exc = executor.submit(dask_tasks.fail_unseen, "unseen").exception(timeout=WAIT)
    assert type(exc) is dask_tasks.Unseen and exc.args == ("unseen",)
    assert extra_state(exc) == {}
    assert one_span(exporter, "unseen").status.status_code is StatusCode.ERROR


def test_exception_attributes_unchanged(client, executor):
    """I7: the caller's exception has the attributes it has without propagate (see extra_state)."""
    plain = client.get_executor().submit(et.fail, "plain", "boom")
    wrapped = executor.submit(et.fail, "wrapped", "boom")
    wrapped_exc = wrapped.exception(timeout=WAIT)
    assert extra_state(wrapped_exc) == vars(plain.exception(timeout=WAIT))
    assert wrapped_exc.__traceback__ is not None  # tblib's restored traceback is not clobbered


def test_worker_dying_mid_task_fails_in_bounded_time(client, exporter, tracer):
    """I7: a task whose worker dies gives KilledWorker in bounded time; its replacement relays."""
    executor = propagate.dask.executor(client)
    with tracer.start_as_current_span("client"):
        future = executor.submit(dask_tasks.die, "dying")
        with pytest.raises(distributed.KilledWorker):
            future.result(timeout=WAIT)
    assert spans_named(exporter, "dying") == []  # recorded in a process that is gone: lost with it
    client.wait_for_workers(WORKERS, timeout=WAIT)
    # The last worker to die was replaced by a process that has run nothing yet.
    fresh = [w for w, names in client.run(et.span_processors).items() if names == []]
    assert fresh
    with tracer.start_as_current_span("client again"):
        seen = propagate.dask.executor(client, workers=fresh[:1]).submit(
            et.record, "after").result(timeout=WAIT)
    span = one_span(exporter, "after")
    assert span.resource.attributes["process.pid"] == seen["pid"] != os.getpid()


def test_context_manager_shuts_down(client):
    """API: a wrapped Dask executor works as a context manager, like the bare one."""
    with propagate.wrap_executor(client.get_executor()) as executor:
        assert executor.submit(et.identity, 3).result(timeout=WAIT) == 3
    with pytest.raises(RuntimeError):
        executor.submit(et.identity, 4)


def test_concurrent_tasks_in_one_worker_keep_their_spans(exporter, tracer, tmp_path: Path):
    """I6: two tasks running at once in one threaded worker each bring home their own span."""
    with local_cluster(1, threads_per_worker=2) as cluster, \
            distributed.Client(cluster) as client:
        executor = propagate.dask.executor(client)
        release = tmp_path / "release"
        with tracer.start_as_current_span("client"):
            first = executor.submit(dask_tasks.concurrent_record, "first", str(tmp_path), 2,
                                    None, WAIT)
            second = executor.submit(dask_tasks.concurrent_record, "second", str(tmp_path), 2,
                                     str(release), WAIT)
            check = exported_at_resolve(first, exporter)
            seen_first = first.result(timeout=WAIT)
            # "second" ended its span too, but holds its result until released
            [(_, names)] = check
            release.touch()
            seen_second = second.result(timeout=WAIT)
    assert seen_first["together"] and seen_second["together"]
    assert seen_first["pid"] == seen_second["pid"]
    assert seen_first["thread"] != seen_second["thread"]
    assert "first" in names and "second" not in names
    assert len(spans_named(exporter, "first")) == len(spans_named(exporter, "second")) == 1


def test_in_process_workers_export_directly_once(exporter, tracer):
    """I6: with Dask workers in this process (processes=False) spans are exported once, directly."""
    with local_cluster(1, threads_per_worker=1, processes=False) as cluster, \
            distributed.Client(cluster) as client:
        executor = propagate.dask.executor(client, task_spans=True)
        with tracer.start_as_current_span("client") as parent:
            seen = executor.submit(et.record, "in-process").result(timeout=WAIT)
    assert seen["pid"] == os.getpid()
    span = one_span(exporter, "in-process")
    task_span = one_span(exporter, "record")
    assert span.parent is not None and span.parent.span_id == task_span.context.span_id
    assert task_span.parent is not None
    assert task_span.parent.span_id == parent.get_span_context().span_id


NO_PROVIDER = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
from opentelemetry import baggage, context
import distributed
import propagate.dask
from tests import engine_tasks as et

cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                   dashboard_address=None,
                                   scheduler_kwargs={{"dashboard_address": "127.0.0.1:0"}})
with cluster, distributed.Client(cluster) as client:
    executor = propagate.dask.executor(client, task_spans=True)
    et.REQUEST_ID.set("req-8")
    context.attach(baggage.set_baggage("tenant", "acme"))
    seen = executor.submit(et.record, "no provider").result(timeout={WAIT})
    print(seen["request_id"], seen["baggage"], seen["trace_id"])
    print(client.run(et.span_processors))
"""


def test_no_tracer_provider():
    """I8: with no tracer provider, registered values and baggage reach Dask workers; no relay."""
    done = subprocess.run([sys.executable, "-W", "error", "-c", NO_PROVIDER],
                          capture_output=True, text=True, timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "req-8 {'tenant': 'acme'} 0"
    assert lines[1].endswith(": []}")  # the worker installed nothing: no relay to feed
    assert "propagate" not in done.stderr


BLOCK_SDK = """
import sys


class NoSDK:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoSDK())
"""


def test_worker_without_sdk_still_runs_tasks(tracer, tmp_path: Path):
    """I8: a worker without opentelemetry-sdk runs tasks in the caller's context; none fail."""
    # A Dask preload runs in each worker process before any task: here it makes the SDK
    # unimportable, as on a worker whose environment lacks the sdk extra.
    preload = tmp_path / "block_sdk.py"
    preload.write_text(BLOCK_SDK)
    with local_cluster(1, threads_per_worker=1, preload=[str(preload)]) as cluster, \
            distributed.Client(cluster) as client:
        executor = propagate.dask.executor(client)
        with tracer.start_as_current_span("client"), setting(et.REQUEST_ID, "req-9"):
            seen = executor.submit(et.seen).result(timeout=WAIT)
    assert seen["request_id"] == "req-9"
    assert seen["span_valid"]


IN_MAIN = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
import distributed
import propagate.dask


def double(x):
    return 2 * x


cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                   dashboard_address=None,
                                   scheduler_kwargs={{"dashboard_address": "127.0.0.1:0"}})
with cluster, distributed.Client(cluster) as client:
    for name, executor in [("plain", client.get_executor()),
                           ("propagate", propagate.dask.executor(client))]:
        try:
            print(name, executor.submit(double, 21).result(timeout={WAIT}))
        except Exception as exc:
            print(name, type(exc).__name__, exc)
"""


def test_function_defined_in_main_runs_on_workers():
    """I1: a function defined in the client's __main__ runs on workers, as with plain Dask."""
    # Run with -c, the workers cannot import the client's __main__: like `dask worker`
    # processes on other hosts, whose __main__ is Dask's own.
    done = subprocess.run([sys.executable, "-c", IN_MAIN], capture_output=True, text=True,
                          timeout=WAIT * 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["plain 42", "propagate 42"]


def test_relay_logs_brings_worker_records_home(client, tracer):
    """I6: with relay_logs, a Dask worker's records reach this process's handler once, in
    order, under the worker's span."""
    from tests import log_tasks

    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    handler = Keep()
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("tests.log_tasks")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        executor = propagate.dask.executor(client, relay_logs=True)
        with tracer.start_as_current_span("client"):
            seen = executor.submit(log_tasks.log_in_span, "work", "one", "two").result(
                timeout=WAIT)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in kept] == ["one", "two"]
    assert {r.process for r in kept} == {seen["pid"]} != {os.getpid()}
    assert {r.otelSpanID for r in kept} == {f"{seen['span_id']:016x}"}
