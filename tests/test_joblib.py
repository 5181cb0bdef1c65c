"""propagate/joblib.py: joblib's Parallel on propagate's backends, with real loky workers.

``propagate-loky`` runs on joblib's own loky executor (worker processes started afresh,
reused across calls and tests, as joblib reuses them); ``propagate-threading`` on joblib's
thread pool. The task functions live in `tests.engine_tasks` and `tests.joblib_tasks`,
which the workers import by name. Tests that hold for both backends run on each.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import pytest
from joblib import Parallel, delayed
from joblib.externals.loky.backend import reduction
from joblib.externals.loky.process_executor import TerminatedWorkerError
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

import propagate
import propagate.joblib
from tests import engine_tasks as et
from tests import joblib_tasks as jt
from tests.helpers import assert_freed, extra_state, one_span, setting, spans_named, with_baggage

NAMES = propagate.joblib.register()
LOKY, THREADING = NAMES
JOBS = 2  # every call asks for the same: joblib reuses one loky executor for all of them
WAIT = 60  # seconds: bounds a hang on a loaded 2-core machine, never reached when all is well
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def loky_workers() -> Iterator[None]:
    """The loky workers these tests start end with the module, not with the test session."""
    yield
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


@pytest.fixture(params=NAMES)
def backend(request: pytest.FixtureRequest) -> str:
    """Each of propagate's backends in turn."""
    name: str = request.param
    return name


def run(backend: str, calls: list[Any], **options: Any) -> Any:
    """``Parallel(...)(calls)`` on ``backend`` with `JOBS` workers."""
    return Parallel(n_jobs=JOBS, backend=backend, **options)(calls)


def ids(span: Any) -> tuple[int, int]:
    sc = span.get_span_context()
    return sc.trace_id, sc.span_id


# -- the API ---------------------------------------------------------------------------------


def test_register_returns_the_names_and_is_idempotent() -> None:
    """API: register() names both backends, every time, and registers each once, by class."""
    from joblib._parallel_backends import LokyBackend, ThreadingBackend
    from joblib.parallel import BACKENDS

    assert propagate.joblib.register() == propagate.joblib.register() == [
        "propagate-loky", "propagate-threading"]
    assert issubclass(BACKENDS[LOKY], LokyBackend)  # joblib manages its memmaps by isinstance
    assert issubclass(BACKENDS[THREADING], ThreadingBackend)
    assert propagate.joblib.__all__ == ["register"]


UNSUPPORTED = """
import joblib
joblib.__version__ = {version!r}
try:
    import propagate.joblib
except ImportError as exc:
    print(exc)
"""


@pytest.mark.parametrize("version", ["1.2.0", "1.7.0", "2.0.0.dev0"])
def test_an_unsupported_joblib_fails_at_import_naming_the_range(version: str) -> None:
    """API, I7: with a joblib release outside the tested range, the import fails, saying so."""
    done = subprocess.run([sys.executable, "-c", UNSUPPORTED.format(version=version)],
                          capture_output=True, text=True, timeout=WAIT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"propagate.joblib supports joblib 1.3 to 1.6, and this is joblib {version}: "
        "install a supported release (pip install 'joblib>=1.3,<1.7')")


def test_one_job_runs_in_the_callers_context(backend: str, tracer: trace.Tracer) -> None:
    """I1: with n_jobs=1 joblib runs the tasks itself, here, in the caller's context."""
    with tracer.start_as_current_span("caller") as caller, setting(et.REQUEST_ID, "req-1"):
        [seen] = Parallel(n_jobs=1, backend=backend)([delayed(et.seen)()])
    assert (seen["pid"], seen["request_id"]) == (os.getpid(), "req-1")
    assert (seen["trace_id"], seen["span_id"]) == ids(caller)


# -- I1: what crosses -----------------------------------------------------------------------


def test_the_issues_example_gives_one_trace(exporter: InMemorySpanExporter,
                                            tracer: trace.Tracer) -> None:
    """I1, I6: parallel_config(backend="propagate-loky") gives one trace across loky workers."""
    with tracer.start_as_current_span("caller") as caller, \
            joblib.parallel_config(backend=LOKY, n_jobs=JOBS):
        seen = Parallel()(delayed(et.record)(f"task-{i}") for i in range(6))
    trace_id, span_id = ids(caller)
    for i, item in enumerate(seen):
        assert item["pid"] != os.getpid()
        span = one_span(exporter, f"task-{i}")
        assert span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.span_id == span_id
        assert span.parent.is_remote
        assert span.context.span_id == item["own_span_id"]
        assert span.resource.attributes["process.pid"] == item["pid"]
        assert span.resource.attributes["host.name"] == socket.gethostname()


def test_baggage_and_registered_vars_cross(backend: str, tracer: trace.Tracer) -> None:
    """I1: baggage and registered ContextVars cross; unregistered ones only to threads."""
    with tracer.start_as_current_span("caller") as caller, \
            with_baggage(tenant="acme", region="eu"), setting(et.REQUEST_ID, "req-2"), \
            setting(et.UNREGISTERED, "caller"):
        [seen] = run(backend, [delayed(et.seen)()])
    assert seen["baggage"] == {"tenant": "acme", "region": "eu"}
    assert seen["request_id"] == "req-2"
    assert (seen["trace_id"], seen["span_id"]) == ids(caller)
    if backend == LOKY:
        assert seen["pid"] != os.getpid()
        assert seen["unregistered"] == "worker"  # not registered: the worker's own value
    else:
        assert seen["pid"] == os.getpid() and seen["thread"] != threading.get_ident()
        assert seen["unregistered"] == "caller"  # a snapshot carries every ContextVar


def test_batches_dispatched_from_callback_threads_carry_the_context(backend: str,
                                                                    tracer: trace.Tracer) -> None:
    """I1: every batch sees the caller's context, though joblib dispatches most of them from
    its callback threads, after the first ones complete: captured when the call starts."""
    with tracer.start_as_current_span("caller") as caller, setting(et.REQUEST_ID, "req-3"):
        parallel = Parallel(n_jobs=JOBS, backend=backend, batch_size=1)
        seen = parallel(delayed(et.seen)() for _ in range(40))
    assert parallel.n_dispatched_batches == 40
    assert {(s["request_id"], s["trace_id"], s["span_id"]) for s in seen} == {
        ("req-3", *ids(caller))}


def test_a_closure_over_a_registered_var_crosses_it_by_name() -> None:
    """I1: a closure sent by value holding a registered ContextVar gets the worker's by name."""
    var = et.REQUEST_ID

    def read() -> str | None:
        return var.get(None)

    with setting(et.REQUEST_ID, "req-4"):
        assert run(LOKY, [delayed(read)()]) == ["req-4"]


def test_a_registered_var_returned_by_a_task_comes_back_by_name() -> None:
    """I1: the workers send a registered ContextVar by name too: the result is the caller's."""
    [var] = run(LOKY, [delayed(jt.the_variable)()])
    assert var is et.REQUEST_ID


def test_loky_still_pickles_the_batch_with_its_own_reducers() -> None:
    """I1: the batch is wrapped, not pickled by propagate: loky's reducers (joblib's memmaps'
    among them) still apply to every argument, as on joblib's own loky backend."""
    reduction.register(jt.Reduced, lambda obj: (str, ("reduced by loky",)))
    try:
        plain = run("loky", [delayed(et.identity)(jt.Reduced())])
        ours = run(LOKY, [delayed(et.identity)(jt.Reduced())])
    finally:
        del reduction._dispatch_table[jt.Reduced]
    assert plain == ours == ["reduced by loky"]


def test_nested_parallel_calls_carry_the_context(backend: str, exporter: InMemorySpanExporter,
                                                 tracer: trace.Tracer) -> None:
    """I1, I6: a Parallel call inside a task runs on propagate-threading (joblib's default for
    nested calls is threads): its tasks see the context, and their spans come home, once."""
    with tracer.start_as_current_span("caller"), setting(et.REQUEST_ID, "req-5"):
        [outer] = run(backend, [delayed(jt.nested)("outer", ["inner-a", "inner-b"])])
    outer_span = one_span(exporter, "outer")
    for item, name in zip(outer["inner"], ["inner-a", "inner-b"], strict=True):
        assert item["pid"] == outer["pid"]
        assert item["thread"] != outer["thread"]
        assert item["request_id"] == "req-5"
        span = one_span(exporter, name)
        assert span.parent is not None and span.parent.span_id == outer_span.context.span_id
        if backend == LOKY:
            assert span.resource.attributes["process.pid"] == outer["pid"] != os.getpid()


# -- I2: nothing leaks ----------------------------------------------------------------------


def test_items_of_a_batch_each_get_their_own_copy(backend: str, tracer: trace.Tracer) -> None:
    """I2: with batch_size > 1, what one item sets is not seen by the next item of its batch,
    nor by the caller."""
    with tracer.start_as_current_span("caller") as caller, setting(et.REQUEST_ID, "req-6"), \
            setting(et.UNREGISTERED, "caller"):
        parallel = Parallel(n_jobs=JOBS, backend=backend, batch_size=4, pre_dispatch="all")
        seen = parallel(delayed(et.change_context)(f"item-{i}") for i in range(8))
        assert parallel.n_dispatched_batches == 2  # two batches of four items each
        assert et.REQUEST_ID.get() == "req-6" and et.UNREGISTERED.get() == "caller"
        assert trace.get_current_span() is caller
    unregistered = "worker" if backend == LOKY else "caller"
    assert {(s["request_id"], s["unregistered"], tuple(s["baggage"]), s["span_id"])
            for s in seen} == {("req-6", unregistered, (), ids(caller)[1])}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_nothing_reaches_the_next_call_on_the_same_workers(backend: str, batch_size: int) -> None:
    """I2: what tasks set is not seen by the tasks of a later call on the same workers, nor
    by the next batch of the same call."""
    with setting(et.REQUEST_ID, "req-7"):
        changed = run(backend, [delayed(et.change_context)(f"item-{i}") for i in range(8)],
                      batch_size=batch_size)
    assert {s["request_id"] for s in changed} == {"req-7"}
    seen = run(backend, [delayed(et.seen)() for _ in range(8)], batch_size=batch_size)
    assert {(s["request_id"], s["unregistered"], tuple(s["baggage"]), s["span_id"])
            for s in seen} == {(None, "worker", (), 0)}


# -- I3, I5: the caller's span, and what is kept --------------------------------------------


def test_the_callers_span_may_end_before_later_batches_run(backend: str, tmp_path: Path,
                                                          exporter: InMemorySpanExporter,
                                                          tracer: trace.Tracer) -> None:
    """I3: with return_as="generator", batches dispatched after the caller's span ended still
    run under it: the context is the one the call started with."""
    release = str(tmp_path / "release")
    with tracer.start_as_current_span("caller") as caller:
        results = Parallel(n_jobs=JOBS, backend=backend, batch_size=1, pre_dispatch=JOBS,
                           return_as="generator")(
            delayed(et.record)(f"late-{i}", release) for i in range(6))
    Path(release).touch()  # the first batches wait for this: all run after the span ended
    seen = list(results)
    caller_span = one_span(exporter, "caller")
    assert caller_span.end_time is not None
    for i, item in enumerate(seen):
        span = one_span(exporter, f"late-{i}")
        assert span.parent is not None and span.parent.span_id == ids(caller)[1]
        assert span.start_time is not None and span.start_time > caller_span.end_time
        assert item["request_id"] is None


def test_nothing_is_kept_after_the_call() -> None:
    """I5: a value in the caller's context is not kept once the call returns, though its
    Parallel, and the thread pool it manages, live on."""
    class Value:
        pass

    value = Value()
    ref = weakref.ref(value)
    with Parallel(n_jobs=JOBS, backend=THREADING) as parallel:
        with setting(jt.PAYLOAD, value):
            assert parallel(delayed(et.identity)(i) for i in range(4)) == [0, 1, 2, 3]
        del value
        assert_freed(ref)


# -- I6: spans come home, once --------------------------------------------------------------


def test_worker_spans_arrive_once_before_joblib_hands_back_each_result(
        exporter: InMemorySpanExporter, tracer: trace.Tracer) -> None:
    """I6: each worker span reaches the caller's processors exactly once, before joblib yields
    its task's result, under the caller's span, with the worker's pid and host."""
    with tracer.start_as_current_span("caller") as caller:
        results = Parallel(n_jobs=JOBS, backend=LOKY, batch_size=1, return_as="generator")(
            delayed(et.record)(f"task-{i}") for i in range(8))
        for i, item in enumerate(results):
            span = one_span(exporter, f"task-{i}")  # exported once, already
            assert span.parent is not None and span.parent.span_id == ids(caller)[1]
            assert span.resource.attributes["process.pid"] == item["pid"] != os.getpid()
            assert span.resource.attributes["host.name"] == socket.gethostname()
    assert len(exporter.get_finished_spans()) == 9


def test_workers_record_into_the_relay_alone(exporter: InMemorySpanExporter,
                                             tracer: trace.Tracer) -> None:
    """I6: after a first task, a loky worker's only span processor is the relay's collector."""
    with tracer.start_as_current_span("caller"):
        seen = run(LOKY, [delayed(jt.record_then_processors)(f"task-{i}") for i in range(4)])
    assert seen == [["_Collector"]] * 4
    assert len(spans_named(exporter, "task-0")) == 1


def test_spans_of_a_failing_batch_arrive_with_its_exception(exporter: InMemorySpanExporter,
                                                            tracer: trace.Tracer) -> None:
    """I6, I7: a batch that raises brings its spans home, once, with the exception."""
    calls = [delayed(et.record)("ok"), delayed(et.fail)("failing", "boom"),
             delayed(et.record)("other-1"), delayed(et.record)("other-2")]
    with tracer.start_as_current_span("caller") as caller, pytest.raises(et.TaskFailed):
        run(LOKY, calls, batch_size=2, pre_dispatch="all")  # batches: [ok, failing], [others]
    for name in ("ok", "failing"):
        span = one_span(exporter, name)
        assert span.parent is not None and span.parent.span_id == ids(caller)[1]
        assert span.resource.attributes["process.pid"] != os.getpid()
    assert one_span(exporter, "failing").status.status_code is StatusCode.ERROR


# -- I7: errors -----------------------------------------------------------------------------


def failure(backend: str) -> BaseException:
    with pytest.raises(et.TaskFailed) as info:
        run(backend, [delayed(et.fail)("failing", "boom")])
    return info.value


@pytest.mark.parametrize(("plain", "ours"), [("loky", LOKY), ("threading", THREADING)])
def test_the_users_exception_arrives_as_joblibs_own_backend_gives_it(plain: str,
                                                                     ours: str) -> None:
    """I7: the exception is the user's, with its remote traceback where joblib's own backend
    gives one, exactly as joblib's own backend gives it."""
    theirs, mine = failure(plain), failure(ours)
    assert type(mine) is type(theirs) is et.TaskFailed
    assert mine.args == theirs.args == ("boom", 42)
    assert type(mine.__cause__) is type(theirs.__cause__)  # loky's remote traceback
    if ours == LOKY:
        assert "in fail" in str(mine.__cause__)
    assert extra_state(mine) == extra_state(theirs)


def test_a_worker_killed_mid_task_fails_in_bounded_time(tmp_path: Path,
                                                        exporter: InMemorySpanExporter,
                                                        tracer: trace.Tracer) -> None:
    """I6, I7: a worker dying mid-task gives joblib's TerminatedWorkerError, without a hang;
    the spans of batches that finished arrived once, and the next call relays again."""
    release = str(tmp_path / "release")
    calls = [delayed(et.record)(f"done-{i}") for i in range(3)]
    with tracer.start_as_current_span("caller"):
        results = Parallel(n_jobs=JOBS, backend=LOKY, batch_size=1, pre_dispatch="all",
                           return_as="generator")([*calls, delayed(jt.die_when)("dying", release)])
        done = [next(results) for _ in calls]
        Path(release).touch()
        started = time.monotonic()
        with pytest.raises(TerminatedWorkerError):
            next(results)
    assert time.monotonic() - started < WAIT
    for i, item in enumerate(done):
        assert one_span(exporter, f"done-{i}").resource.attributes["process.pid"] == item["pid"]
    assert spans_named(exporter, "dying") == []  # recorded in a process that is gone
    with tracer.start_as_current_span("again"):
        [after] = run(LOKY, [delayed(et.record)("after")])
    assert one_span(exporter, "after").resource.attributes["process.pid"] == after["pid"]
    assert len(spans_named(exporter, "done-0")) == 1


def test_an_unpicklable_registered_value_fails_at_the_call_naming_it() -> None:
    """I7: a registered ContextVar whose value cannot cross fails the call, naming the
    variable, before any task is sent; threads need no pickling, and take it."""
    lock = threading.Lock()
    with setting(jt.PAYLOAD, lock):
        with pytest.raises(propagate.ContextSerializationError, match=r"tests\.joblib\.payload"):
            run(LOKY, [delayed(et.identity)(i) for i in range(4)])
        assert run(THREADING, [delayed(et.identity)(i) for i in range(4)]) == [0, 1, 2, 3]


def test_what_loky_cannot_pickle_fails_as_with_joblibs_own_loky() -> None:
    """I7: an argument loky cannot pickle fails as joblib's loky fails it, with its error."""
    errors = []
    for backend in ("loky", LOKY):
        with pytest.raises(Exception) as info:
            run(backend, [delayed(et.identity)(threading.Lock())])
        errors.append(info.value)
    plain, ours = errors
    assert type(ours) is type(plain)
    assert type(ours.__cause__) is type(plain.__cause__)


def test_a_closure_over_an_unregistered_var_fails_naming_register() -> None:
    """I7: an unregistered ContextVar cannot cross: the error says to register it."""
    var = et.UNREGISTERED

    def read() -> str:
        return var.get()

    with pytest.raises(Exception) as info:
        run(LOKY, [delayed(read)()])
    chain = [info.value, info.value.__cause__, info.value.__context__]
    assert any("propagate.register(var)" in str(exc) for exc in chain if exc is not None), chain


# -- I8: no tracer provider -----------------------------------------------------------------


NO_PROVIDER = """
import joblib
from opentelemetry import baggage, context
import os
import propagate.joblib
from tests import engine_tasks as et

propagate.joblib.register()
et.REQUEST_ID.set("req-8")
context.attach(baggage.set_baggage("tenant", "acme"))
with joblib.parallel_config(backend="propagate-loky", n_jobs=2):
    [seen] = joblib.Parallel()([joblib.delayed(et.record)("no provider")])
print(seen["request_id"], seen["baggage"], seen["trace_id"], seen["pid"] != os.getpid())
"""


def test_no_tracer_provider() -> None:
    """I8: with no tracer provider, registered values and baggage reach loky workers; the
    spans there are non-recording, and nothing is logged."""
    done = subprocess.run([sys.executable, "-W", "error", "-c", NO_PROVIDER],
                          capture_output=True, text=True, timeout=WAIT * 2, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["req-8 {'tenant': 'acme'} 0 True"]
    assert done.stderr == ""
