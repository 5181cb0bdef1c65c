"""propagate.InterpreterPoolExecutor (3.14+): the detached context into subinterpreters.

A subinterpreter shares no objects with the caller: tasks cross pickled, as to a process,
and the spans they record come home through the relay. The task functions live in
`tests.process_tasks`; lambdas and closures defined here cross by value. I5, for every
pool, is checked in test_executor.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from tests import process_tasks as pt
from tests.helpers import one_span, with_baggage, with_processor

pytestmark = pytest.mark.skipif(sys.version_info < (3, 14),
                                reason="InterpreterPoolExecutor is new in Python 3.14")
WAIT = 60


@pytest.fixture
def pool() -> Iterator[cf.Executor]:
    with propagate.InterpreterPoolExecutor(2) as executor:
        yield executor


def causes(error: BaseException) -> str:
    """The messages of ``error`` and of every exception it was raised from, or during."""
    found: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(found) < 10:
        found.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(found)


def in_request(tracer: trace.Tracer, fn: Any) -> tuple[Any, trace.Span]:
    """``fn()`` inside a request span with baggage and a registered variable set."""
    with tracer.start_as_current_span("request") as request, with_baggage(tenant="acme"):
        token = pt.REQUEST_ID.set("req-7")
        try:
            return fn(), request
        finally:
            pt.REQUEST_ID.reset(token)


def test_task_sees_the_submitters_context(pool: cf.Executor, tracer: trace.Tracer) -> None:
    """I1: trace parent, baggage and registered variables cross; unregistered ones do not."""
    seen, request = in_request(tracer, lambda: pool.submit(pt.observe).result(timeout=WAIT))
    sc = request.get_span_context()
    assert (seen["trace_id"], seen["span_id"], seen["is_remote"]) == (sc.trace_id, sc.span_id, True)
    assert seen["baggage"] == {"tenant": "acme"}
    assert seen["request_id"] == "req-7"
    assert seen["unregistered"] == "default"


def test_spans_come_home_once_before_the_future_resolves(
        pool: cf.Executor, tracer: trace.Tracer, exporter: InMemorySpanExporter) -> None:
    """I6: a subinterpreter's spans reach the parent's exporter once, under the request."""
    def run() -> Any:
        future = pool.submit(pt.record_spans, "outer", "inner")
        future.result(timeout=WAIT)
        return [s.name for s in exporter.get_finished_spans()]  # before request ends

    names, request = in_request(tracer, run)
    assert sorted(names) == ["inner", "outer"]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert len(exporter.get_finished_spans()) == 3
    assert spans["outer"].parent.span_id == request.get_span_context().span_id
    assert spans["inner"].parent.span_id == spans["outer"].context.span_id
    assert {s.context.trace_id for s in spans.values()} == {request.get_span_context().trace_id}


def test_lambdas_and_closures_cross(pool: cf.Executor, tracer: trace.Tracer) -> None:
    """I1: what the stdlib's interpreter pool refuses (closures over globals) is sent by value."""
    suffix = "!"
    seen, _ = in_request(tracer, lambda: pool.submit(
        lambda: pt.REQUEST_ID.get() + suffix).result(timeout=WAIT))
    assert seen == "req-7!"


def test_main_functions_cross() -> None:
    """I1: a function defined in ``__main__`` runs in the subinterpreter, which has no such main."""
    script = textwrap.dedent("""
        import contextvars, propagate
        VAR = propagate.register(contextvars.ContextVar("main.var"))
        def work(x):
            return (x, VAR.get())
        if __name__ == "__main__":
            VAR.set("from-main")
            with propagate.InterpreterPoolExecutor(1) as pool:
                print(pool.submit(work, 3).result(timeout=60))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=WAIT, check=True)
    assert out.stdout.strip() == "(3, 'from-main')", out.stderr


def test_what_cannot_be_sent_fails_on_the_future_as_the_stdlibs(pool: cf.Executor) -> None:
    """I7: an argument that cannot cross fails the task as with the stdlib's pool: on the
    future, the same exception type, caused by the pickler's own error."""
    with cf.InterpreterPoolExecutor(1) as stdlib:  # type: ignore[attr-defined]
        expected = stdlib.submit(pt.square, threading.Lock()).exception(timeout=WAIT)
    error = pool.submit(pt.square, threading.Lock()).exception(timeout=WAIT)
    assert expected is not None and error is not None
    assert type(error) is type(expected)
    assert "_thread.lock" in causes(error) and "_thread.lock" in causes(expected)
    assert pool.submit(pt.square, 2).result(timeout=WAIT) == 4  # the pool is fine


def ephemeral_function() -> Any:
    """A function found by name here, in a module no other interpreter can import."""
    module = types.ModuleType("tests_ephemeral_module")
    # it reads a global: a function that does not is shared by its code, not its name
    exec("import os\ndef work(x):\n    return os.getpid() + x\n", module.__dict__)
    sys.modules[module.__name__] = module
    return module.work


@pytest.mark.parametrize("task", ["plain", "object"])
def test_what_cannot_be_rebuilt_there_fails_as_the_stdlibs(pool: cf.Executor, task: str) -> None:
    """I7: a task that pickles but cannot be unpickled in the subinterpreter fails as with
    the stdlib's pool: the same exception type on the future, naming the unpickler's
    error. A plain task (a function by name, plain data) goes as one blob made at submit,
    anything else through the send check: both fail alike."""
    if task == "plain":
        fn, args, message = ephemeral_function(), (1,), "tests_ephemeral_module"
    else:
        fn, args, message = pt.touch, ("/nonexistent/never", pt.FailsToLoad()), "FailsToLoad"
    try:
        with cf.InterpreterPoolExecutor(1) as stdlib:  # type: ignore[attr-defined]
            expected = stdlib.submit(fn, *args).exception(timeout=WAIT)
        error = pool.submit(fn, *args).exception(timeout=WAIT)
    finally:
        sys.modules.pop("tests_ephemeral_module", None)
    assert expected is not None and error is not None
    assert type(error) is type(expected), (causes(error), causes(expected))
    assert message in causes(expected) and message in causes(error)


def test_small_plain_tasks_are_pickled_at_submit(tmp_path: Any) -> None:
    """API: as documented, a small task of plain data is pickled at submit, so a list changed
    after submit arrives as it was (the stdlib's pool would send it as it is then); a big
    one is pickled when sent, and arrives changed."""
    gate = str(tmp_path / "gate")
    small, big = [1, 2, 3], [b"x" * (1 << 17)]
    with propagate.InterpreterPoolExecutor(1) as pool:
        busy = pool.submit(pt.wait_for, gate)  # holds the one worker until the gate opens
        seen_small, seen_big = pool.submit(pt.digest, small), pool.submit(pt.digest, big)
        small.append(4)
        big.append(b"y")
        pt.touch(gate)
        busy.result(timeout=WAIT)
        assert seen_small.result(timeout=WAIT)["digest"] == pt.digest([1, 2, 3])["digest"]
        assert seen_big.result(timeout=WAIT)["digest"] == pt.digest(big)["digest"]


@pytest.mark.parametrize("data", [b"small", bytes(1 << 22), pt.Marked("object")],
                         ids=["small", "big", "object"])
def test_arguments_cross_with_the_context(
        pool: cf.Executor, tracer: trace.Tracer, data: Any) -> None:
    """I1: plain arguments of any size, and objects, arrive whole, with the submitter's
    context."""
    seen, request = in_request(tracer, lambda: pool.submit(pt.digest, data).result(timeout=WAIT))
    assert seen["digest"] == pt.digest(data)["digest"]
    assert seen["trace_id"] == request.get_span_context().trace_id
    assert seen["request_id"] == "req-7"


def test_main_functions_of_a_script_as_the_stdlibs(tmp_path: Any) -> None:
    """API: a script's ``__main__`` functions cross by name, as with the stdlib's pool, so they
    see the same ``__main__`` an initializer sets globals in."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import sys, concurrent.futures as cf, propagate
        STATUS = "uninitialized"
        def init(x):
            global STATUS
            STATUS = x
        def status():
            return STATUS, sys.modules["__main__"].__dict__.get("STATUS"), __name__
        if __name__ == "__main__":
            for cls in (cf.InterpreterPoolExecutor, propagate.InterpreterPoolExecutor):
                with cls(1, initializer=init, initargs=("initialized",)) as pool:
                    print(pool.submit(status).result(timeout=60), STATUS)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=WAIT, check=True)
    stdlib, ours = out.stdout.strip().splitlines()
    assert ours == stdlib, out.stderr


def test_unpicklable_registered_value_fails_at_submit(pool: cf.Executor) -> None:
    """I7: a registered variable that cannot cross fails at submit, naming the variable."""
    token = pt.REQUEST_ID.set(threading.Lock())  # type: ignore[arg-type]
    try:
        with pytest.raises(propagate.ContextSerializationError, match="request_id"):
            pool.submit(pt.observe)
    finally:
        pt.REQUEST_ID.reset(token)


def test_exception_arrives_unchanged_with_its_spans(
        pool: cf.Executor, tracer: trace.Tracer, exporter: InMemorySpanExporter) -> None:
    """I6, I7: the user's exception type and args arrive; its spans arrive once."""
    def run() -> BaseException | None:
        return pool.submit(pt.fail_after_span, "failing").exception(timeout=WAIT)

    exc, _ = in_request(tracer, run)
    assert type(exc) is pt.TaskError and exc.args == ("boom", 42)
    assert [s.name for s in exporter.get_finished_spans()].count("failing") == 1


@pytest.mark.parametrize("task", [pt.fail_after_span, pt.raise_unshareable],
                         ids=["shareable", "not-shareable"])
def test_a_failure_reaches_the_future_as_with_the_stdlibs(pool: cf.Executor,
                                                          task: Any) -> None:
    """I7: propagate's workers call the task without the stdlib's per-argument conversion,
    and an exception still arrives as with the stdlib's pool: the same type, raised from
    the same ``ExecutionFailed``, or that alone when the exception cannot be shared."""
    with cf.InterpreterPoolExecutor(1) as stdlib:  # type: ignore[attr-defined]
        expected = stdlib.submit(task, "failing").exception(timeout=WAIT)
    error = pool.submit(task, "failing").exception(timeout=WAIT)
    assert expected is not None and error is not None
    assert type(error) is type(expected), (causes(error), causes(expected))
    assert type(error.__cause__) is type(expected.__cause__)
    assert str(error).splitlines()[0] == str(expected).splitlines()[0]  # then tracebacks
    assert pool.submit(pt.square, 3).result(timeout=WAIT) == 9  # the pool is fine


def test_an_exception_that_cannot_be_shared_fails_and_its_spans_arrive(
        pool: cf.Executor, exporter: InMemorySpanExporter) -> None:
    """I6: where the stdlib's pool would give only ``ExecutionFailed`` (the exception cannot
    be shared), spans would be lost with it: the pickler's own error goes instead,
    naming what could not be sent, as from a process pool, and carries them home once."""
    with pytest.raises(TypeError, match="lock"):
        pool.submit(pt.raise_unpicklable, "kept").result(timeout=WAIT)
    assert [s.name for s in exporter.get_finished_spans()].count("kept") == 1


def test_nothing_leaks_between_tasks(tracer: trace.Tracer) -> None:
    """I2: what one task sets is gone for the next task in the same subinterpreter."""
    with propagate.InterpreterPoolExecutor(1) as pool:
        in_request(tracer, lambda: pool.submit(pt.leak).result(timeout=WAIT))
        after = pool.submit(pt.observe).result(timeout=WAIT)
    assert (after["request_id"], after["unregistered"]) == ("unset", "default")
    assert after["baggage"] == {}
    assert after["trace_id"] == 0
    assert pt.REQUEST_ID.get() == "unset"


def test_fire_and_forget_parent(pool: cf.Executor, tracer: trace.Tracer,
                                exporter: InMemorySpanExporter) -> None:
    """I3: the submitter's span may end before the task runs; the task's span is its child."""
    with tracer.start_as_current_span("short") as short:
        future = pool.submit(pt.record_spans, "later")
    future.result(timeout=WAIT)
    later = one_span(exporter, "later")
    assert later.parent.span_id == short.get_span_context().span_id


def test_task_spans_and_link(tracer: trace.Tracer, exporter: InMemorySpanExporter) -> None:
    """I4: task_spans names the span after the function, on the worker; link starts a new trace."""
    with propagate.InterpreterPoolExecutor(1, task_spans=True, link=True) as pool, \
            tracer.start_as_current_span("caller") as caller:
        pool.submit(pt.square, 1).result(timeout=WAIT)
    task = one_span(exporter, "square")
    assert task.parent is None
    assert task.context.trace_id != caller.get_span_context().trace_id
    assert [lk.context.span_id for lk in task.links] == [caller.get_span_context().span_id]


def test_wrap_executor_and_run_in_executor_use_the_detached_path(tracer: trace.Tracer) -> None:
    """I1: the stdlib's interpreter pool, wrapped or given to run_in_executor, gets a context."""
    with cf.InterpreterPoolExecutor(1) as stdlib_pool:
        wrapped = propagate.wrap_executor(stdlib_pool)
        seen, _ = in_request(tracer, lambda: wrapped.submit(pt.observe).result(timeout=WAIT))
        assert seen["request_id"] == "req-7"

        async def main() -> Any:
            return await propagate.run_in_executor(stdlib_pool, pt.observe)

        seen, _ = in_request(tracer, lambda: asyncio.run(main()))
        assert (seen["request_id"], seen["baggage"]) == ("req-7", {"tenant": "acme"})


def test_map_with_buffersize(pool: cf.Executor, tracer: trace.Tracer) -> None:
    """I1: map(buffersize=) (3.14) submits lazily, each item still in the caller's context."""
    seen, _ = in_request(tracer, lambda: list(pool.map(  # type: ignore[call-arg]
        pt.tagged, range(6), buffersize=2)))
    assert seen == [f"req-7:{i}" for i in range(6)]


def test_exception_object_raised_by_several_tasks_sends_each_span_once(
        exporter: InMemorySpanExporter) -> None:
    """I6: one subinterpreter's cached exception object, raised task after task, and then
    returned as a value: each task's span arrives once."""
    with propagate.InterpreterPoolExecutor(1) as pool:
        for name in ("one", "two", "three"):
            with pytest.raises(pt.TaskError, match="cached"):
                pool.submit(pt.raise_cached, name).result(timeout=WAIT)
        assert isinstance(pool.submit(pt.return_cached, "four").result(timeout=WAIT),
                          pt.TaskError)
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "four", "one", "three", "two"]


def test_baggage_crosses_as_strings(pool: cf.Executor) -> None:
    """I1: baggage crosses as OpenTelemetry carries it, as strings."""
    with with_baggage(count=3):
        assert pool.submit(pt.baggage_value, "count").result(timeout=WAIT) == "3"


def test_relayed_spans_go_through_on_start(pool: cf.Executor, tracer: trace.Tracer,
                                           exporter: InMemorySpanExporter) -> None:
    """I6: a subinterpreter's spans reach the parent's processors' on_start, then on_end."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Starts(SpanProcessor):
        def __init__(self) -> None:
            self.names: list[str] = []

        def on_start(self, span: Any, parent_context: Any = None) -> None:
            self.names.append(span.name)

    starts = Starts()
    with with_processor(starts):
        in_request(tracer, lambda: pool.submit(pt.record_spans, "outer").result(timeout=WAIT))
    assert sorted(starts.names) == ["outer", "request"]
