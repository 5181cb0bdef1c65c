"""propagate/debug/: jitter, task lineage, live()/assert_quiescent, ContextFilter, doctor()."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import logging
import math
import multiprocessing
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace

import propagate
import propagate.debug as debug
from propagate import _switch

WAIT = 10  # seconds: every wait in this file is bounded
FMT = "%(levelname)s [%(trace_id)s/%(span_id)s %(thread_name)s %(task_name)s] %(message)s"
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("test_debug.request")


def ids(span: trace.Span) -> str:
    sc = span.get_span_context()
    return f"{sc.trace_id:032x}/{sc.span_id:016x}"


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that parked threads wait on; set at teardown so nothing stays parked."""
    event = threading.Event()
    yield event
    event.set()


# -- jitter --------------------------------------------------------------------------------


@pytest.mark.parametrize("probability, max_delay", [
    (-0.1, 0.001), (1.5, 0.001), (math.nan, 0.001), (0.5, -1.0), (0.5, math.inf), (0.5, math.nan),
])
def test_jitter_rejects_bad_arguments(probability: float, max_delay: float) -> None:
    """API: jitter refuses a probability outside [0, 1] or a bad delay at once, naming it."""
    before = _switch.hook
    with pytest.raises(ValueError, match=r"probability|max_delay") as info, \
            debug.jitter(1, probability, max_delay):
        pass
    assert repr(probability if not 0 <= probability <= 1 else max_delay) in str(info.value)
    assert _switch.hook is before


def test_jitter_fires_at_every_switch_point() -> None:
    """I1, API: under jitter every switch point fires and sleeps, and I1 still holds."""
    tracer = trace.get_tracer("tests")
    before = _switch.hook  # the plugin's, under --propagate-jitter
    with debug.jitter(seed=3, probability=1.0, max_delay=0.0002) as hook, \
            tracer.start_as_current_span("submitter") as span, \
            propagate.ThreadPoolExecutor(max_workers=2) as pool:
        seen = list(pool.map(lambda _: ids(trace.get_current_span()), range(20)))
        with propagate.capture().attach():
            pass
    assert seen == [ids(span)] * 20
    assert hook.counts["capture"] == 21  # 20 submits and one capture()
    assert hook.counts["task-start"] == 20
    assert hook.counts["task-end"] == 20 and hook.counts["attach"] == hook.counts["detach"] == 1
    assert hook.delays == sum(hook.counts.values())
    assert _switch.hook is before


def test_jitter_is_repeatable_for_a_seed() -> None:
    """API: one jitter seed gives the same sleeps for the same calls; another seed does not."""
    def run(seed: int) -> tuple[int, float]:
        with debug.jitter(seed, probability=0.5, max_delay=0.00001) as hook:
            for _ in range(100):
                _switch.point("attach")
        return hook.delays, hook.slept

    assert run(5) == run(5)
    assert run(5) != run(6)
    assert 0 < run(5)[0] < 100


def test_jitter_nests_and_restores_the_previous_hook() -> None:
    """API: an inner jitter replaces the outer one and hands it back, even on error."""
    before = _switch.hook
    with debug.jitter(1) as outer:
        with pytest.raises(KeyError), debug.jitter(2) as inner:
            assert _switch.hook is inner
            _switch.point("capture")
            raise KeyError("boom")
        assert _switch.hook is outer
        _switch.point("capture")
    assert _switch.hook is before
    assert (outer.counts["capture"], inner.counts["capture"]) == (1, 1)


def test_jitter_counts_every_call_from_many_threads() -> None:
    """API: the jitter hook is safe to call from many threads at once; no count is lost."""
    start = threading.Barrier(8, timeout=WAIT)

    def hammer() -> None:
        start.wait()
        for _ in range(300):
            _switch.point("task-start")

    with debug.jitter(9, probability=0.1, max_delay=0.0) as hook:
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert hook.counts["task-start"] == 8 * 300
    assert 0 < hook.delays < 8 * 300


def _hook_counts_in_worker() -> dict[str, int]:
    return dict(getattr(_switch.hook, "counts", {}))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_jitter_reaches_forked_workers() -> None:
    """API: a worker process forked under a jitter runs its tasks under it too."""
    with debug.jitter(4, probability=0.0, max_delay=0.0), propagate.ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        counts = pool.submit(_hook_counts_in_worker).result(timeout=WAIT)
    assert counts["task-start"] >= 1 and counts["attach"] >= 1


def _fire_switch_point() -> None:
    _switch.point("capture")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_jitter_survives_a_fork_while_its_lock_is_held() -> None:
    """I7: a child forked while a thread is inside the jitter's lock does not hang on it."""
    ctx: Any = multiprocessing.get_context("fork")
    with debug.jitter(8, probability=0.0, max_delay=0.0) as hook:
        with hook._lock:  # as if another thread were drawing a sleep at the moment of fork
            child = ctx.Process(target=_fire_switch_point)
            child.start()
        child.join(WAIT)
        if child.is_alive():
            child.kill()
            child.join(WAIT)
    assert child.exitcode == 0


# -- task lineage --------------------------------------------------------------------------


def test_track_tasks_draws_each_task_under_its_creator() -> None:
    """API: task_tree indents every live task under the task that created it."""
    async def leaf(done: asyncio.Event) -> None:
        await done.wait()

    async def parent(done: asyncio.Event) -> None:
        child = asyncio.create_task(leaf(done), name="child")
        await asyncio.gather(child, asyncio.create_task(leaf(done), name="sibling"))

    async def main() -> str:
        debug.track_tasks()
        done = asyncio.Event()
        task = asyncio.create_task(parent(done), name="parent")
        await asyncio.sleep(0.01)
        tree = debug.task_tree()
        done.set()
        await asyncio.wait_for(task, WAIT)
        return tree

    lines = asyncio.run(main()).splitlines()
    assert lines[0].startswith("task 'Task-") and ".main()" in lines[0], lines
    assert [(len(line) - len(line.lstrip()), line.split("'")[1]) for line in lines[1:]] == [
        (2, "parent"), (4, "child"), (4, "sibling")], lines
    assert ".leaf() at " in lines[2]


def test_track_tasks_chains_the_existing_factory() -> None:
    """API: under track_tasks, the loop's own task factory still makes every task, with its
    name and context."""
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(getattr(coro, "__name__", "?"))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def child() -> str:
        return REQUEST.get("unset")

    async def main() -> tuple[str, str, str]:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(factory)
        debug.track_tasks()
        debug.track_tasks()  # again: no second layer
        assert loop.get_task_factory().previous is factory  # type: ignore[union-attr]
        named = asyncio.create_task(child(), name="named")
        ctx = contextvars.copy_context()
        ctx.run(REQUEST.set, "from-context")
        if sys.version_info >= (3, 11):
            in_ctx = asyncio.create_task(child(), context=ctx)
        else:
            in_ctx = ctx.run(asyncio.create_task, child())
        return named.get_name(), await named, await in_ctx

    assert asyncio.run(main()) == ("named", "unset", "from-context")
    assert made[:2] == ["child", "child"]  # then asyncio.run's own shutdown tasks


def test_task_tree_shows_a_finished_creator() -> None:
    """API: task_tree draws a task that outlives its creator at the top, naming the creator."""
    async def orphan(done: asyncio.Event) -> None:
        await done.wait()

    async def creator(done: asyncio.Event) -> asyncio.Task[None]:
        return asyncio.create_task(orphan(done), name="orphan")

    async def main() -> str:
        debug.track_tasks()
        done = asyncio.Event()
        task = await asyncio.create_task(creator(done), name="creator")
        out = io.StringIO()
        debug.print_task_tree(file=out)
        done.set()
        await asyncio.wait_for(task, WAIT)
        return out.getvalue()

    tree = asyncio.run(main())
    assert "\ntask 'orphan' " in tree and "(created by creator, finished)" in tree, tree


# -- live and assert_quiescent -------------------------------------------------------------


def test_live_shows_the_span_of_each_propagate_thread(release: threading.Event) -> None:
    """API: live() shows the current span of the caller, of a pool worker and of a
    propagate.Thread."""
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("request") as span, \
            propagate.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pooled") as pool:
        parked = threading.Barrier(4, timeout=WAIT)

        def park() -> None:
            parked.wait()
            release.wait(WAIT)

        future = pool.submit(park)
        started = [propagate.Thread(target=park, name="carried", daemon=True),
                   threading.Thread(target=park, name="plain")]
        for t in started:
            t.start()
        parked.wait()
        snapshot = debug.live()
        release.set()
        future.result(timeout=WAIT)
        for t in started:
            t.join(WAIT)
    threads = {t.name: t for t in snapshot.threads}
    assert threads[threading.current_thread().name].span == ids(span)
    assert threads["pooled_0"].span == ids(span)
    assert threads["carried"].span == ids(span) and threads["carried"].daemon
    assert threads["plain"].span is None and not threads["plain"].daemon
    assert f"daemon thread 'carried' (ident {threads['carried'].ident}) in span {ids(span)}" \
        in str(snapshot)


async def _waits_here(done: asyncio.Event) -> None:
    await done.wait()  # the line live() must report


def test_live_shows_where_each_task_waits() -> None:
    """API: live() lists a pending task with its coroutine, where it waits, and (3.12+) its
    span."""
    line = _waits_here.__code__.co_firstlineno + 1
    spans: list[str] = []

    async def main() -> debug.Live:
        done = asyncio.Event()
        with trace.get_tracer("tests").start_as_current_span("request") as span:
            spans.append(ids(span))
            task = asyncio.create_task(_waits_here(done), name="waiter")
        await asyncio.sleep(0)
        snapshot = debug.live()
        done.set()
        await asyncio.wait_for(task, WAIT)
        return snapshot

    snapshot = asyncio.run(main())
    (waiter,) = [t for t in snapshot.tasks if t.name == "waiter"]
    assert (waiter.coro, waiter.file, waiter.line) == ("_waits_here", __file__, line)
    assert waiter.span == (spans[0] if sys.version_info >= (3, 12) else None)
    assert all(t.coro != "main" for t in snapshot.tasks)  # the caller's own task is left out
    assert f"task 'waiter' _waits_here() at {__file__}:{line}" in str(snapshot)


def test_live_outside_a_loop_sees_tasks_of_a_stopped_loop() -> None:
    """API: live() from synchronous code lists the tasks pending on a loop that is not
    running."""
    loop = asyncio.new_event_loop()
    try:
        async def start() -> asyncio.Task[None]:
            return asyncio.create_task(asyncio.sleep(WAIT), name="left-behind")

        task = loop.run_until_complete(start())
        assert "left-behind" in [t.name for t in debug.live().tasks]
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        assert "left-behind" not in [t.name for t in debug.live().tasks]
    finally:
        loop.close()


def _wait_for(event: Any) -> None:
    event.wait(WAIT)


def test_assert_quiescent_names_what_outlives_the_baseline(release: threading.Event) -> None:
    """API: assert_quiescent names a thread and a child process started after the baseline,
    then passes once they are gone."""
    old = threading.Thread(target=release.wait, args=(WAIT,), name="old-thread")
    old.start()
    baseline = debug.live()
    ctx: Any = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    stop = ctx.Event()
    process = ctx.Process(target=_wait_for, args=(stop,), name="leaky-process", daemon=True)
    process.start()
    thread = threading.Thread(target=release.wait, args=(WAIT,), name="leaky-thread")
    thread.start()
    try:
        with pytest.raises(AssertionError) as info:
            debug.assert_quiescent(baseline, grace=0.05)
        message = str(info.value)
        assert "thread 'leaky-thread'" in message and "process 'leaky-process'" in message
        assert "old-thread" not in message and "MainThread" not in message
        stop.set()
        process.join(WAIT)
        with pytest.raises(AssertionError, match="leaky-thread") as info:
            debug.assert_quiescent(baseline, grace=0.05)
        assert "leaky-process" not in str(info.value)
    finally:
        stop.set()
        release.set()
        thread.join(WAIT)
        process.join(WAIT)
        old.join(WAIT)
    debug.assert_quiescent(baseline, grace=WAIT)


def test_assert_quiescent_matches_threads_by_identity_not_ident() -> None:
    """API: assert_quiescent reports a new thread even with the name and ident of a baseline
    thread."""
    release, done = threading.Event(), threading.Event()
    first = threading.Thread(target=done.wait, args=(WAIT,), name="same")
    first.start()
    baseline = debug.live()
    done.set()
    first.join(WAIT)
    second = threading.Thread(target=release.wait, args=(WAIT,), name="same")
    second.start()
    try:
        with pytest.raises(AssertionError, match="thread 'same'"):
            debug.assert_quiescent(baseline, grace=0)
    finally:
        release.set()
        second.join(WAIT)


def test_assert_quiescent_waits_for_a_finishing_thread(release: threading.Event) -> None:
    """API: to assert_quiescent, a thread that finishes within the grace period is no leak."""
    baseline = debug.live()
    thread = threading.Thread(target=release.wait, args=(WAIT,), name="finishing")
    thread.start()
    threading.Timer(0.05, release.set).start()
    debug.assert_quiescent(baseline, grace=WAIT)
    assert not thread.is_alive()


def test_assert_quiescent_without_baseline_counts_every_other_thread(
        release: threading.Event) -> None:
    """API: assert_quiescent without a baseline reports any thread but the main and calling
    ones."""
    thread = threading.Thread(target=release.wait, args=(WAIT,), name="any-thread")
    thread.start()
    try:
        with pytest.raises(AssertionError, match="thread 'any-thread'"):
            debug.assert_quiescent(grace=0)
    finally:
        release.set()
        thread.join(WAIT)


# -- ContextFilter -------------------------------------------------------------------------


def _log_lines(logger_name: str, fn: Any) -> str:
    """Run ``fn`` with a ContextFilter handler on ``logger_name``; return what it wrote."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(debug.ContextFilter())
    handler.setFormatter(logging.Formatter(FMT))
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        fn()
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def _log_in_worker() -> str:
    log = logging.getLogger("test_debug.worker")
    return _log_lines("test_debug.worker", lambda: log.info("in worker"))


def test_context_filter_in_a_thread_pool() -> None:
    """I1: lines logged by a pooled task carry the submitter's trace and span ids."""
    log = logging.getLogger("test_debug.pool")
    tracer = trace.get_tracer("tests")

    def submit() -> None:
        with tracer.start_as_current_span("request") as span, \
                propagate.ThreadPoolExecutor(1, thread_name_prefix="logger") as pool:
            pool.submit(log.info, "in worker").result(timeout=WAIT)
            expected.append(ids(span))

    expected: list[str] = []
    text = _log_lines("test_debug.pool", submit)
    assert text == f"INFO [{expected[0]} logger_0 -] in worker\n"


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_context_filter_in_a_process_pool() -> None:
    """I1: lines logged in a worker process carry the submitter's trace and span ids."""
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("request") as span, propagate.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork")) as pool:
        text = pool.submit(_log_in_worker).result(timeout=WAIT)
    assert text.startswith(f"INFO [{ids(span)} ") and text.endswith(" -] in worker\n"), text


def test_context_filter_outside_spans_and_in_tasks() -> None:
    """API: ContextFilter gives zero ids outside any span, the task's name inside a task, and
    drops nothing."""
    log = logging.getLogger("test_debug.task")

    names: list[str] = []

    async def main() -> None:
        await asyncio.create_task(asyncio.to_thread(log.info, "in thread"), name="t1")
        log.info("in task")
        names.append(asyncio.current_task().get_name())  # type: ignore[union-attr]

    def outside_then_loop() -> None:
        log.info("outside")
        asyncio.run(main())

    text = _log_lines("test_debug.task", outside_then_loop)
    zeros = f"{'0' * 32}/{'0' * 16}"
    me = threading.current_thread().name
    lines = text.splitlines()
    assert lines[0] == f"INFO [{zeros} {me} -] outside"
    assert lines[1].startswith(f"INFO [{zeros} ") and lines[1].endswith(" -] in thread")
    assert lines[2] == f"INFO [{zeros} {me} {names[0]}] in task"
    assert len(lines) == 3


def test_doctor_in_process_sees_this_process() -> None:
    """API: doctor()'s in-process report names this session's SDK provider and registered
    vars."""
    import contextvars
    import io

    name = "tests.test_debug.doctor_var"
    propagate.register(contextvars.ContextVar(name))
    out = io.StringIO()
    debug.doctor(out)
    assert "opentelemetry.sdk.trace.TracerProvider" in out.getvalue()
    assert name in out.getvalue()
    assert "relay available                   yes" in out.getvalue()


OTEL_FIELDS = ("otelTraceID", "otelSpanID", "otelTraceSampled", "otelServiceName")


def _fields_seen(make_record: Any) -> list[dict[str, Any]]:
    """OpenTelemetry's logging fields on a record made outside any span, then inside one."""
    tracer = trace.get_tracer("tests")
    seen = []
    for inside in (False, True):
        with contextlib.ExitStack() as stack:
            names = {}
            if inside:  # the span's own ids, read back as placeholders
                sc = stack.enter_context(tracer.start_as_current_span("r")).get_span_context()
                names = {f"{sc.trace_id:032x}": "<trace id>", f"{sc.span_id:016x}": "<span id>"}
            record = make_record()
            fields = {name: getattr(record, name) for name in OTEL_FIELDS}
            seen.append({k: names.get(v, v) if isinstance(v, str) else v
                         for k, v in fields.items()})
    return seen


def test_context_filter_sets_opentelemetrys_logging_fields() -> None:
    """API: ContextFilter sets the fields OpenTelemetry's logging instrumentation sets, with
    the values that instrumentation gives them, outside a span and inside one."""
    from opentelemetry.instrumentation.logging import LoggingInstrumentor  # the test extra

    theirs = LoggingInstrumentor()
    # set_logging_format: the one switch every release has (0.62 injects only with it); it
    # also calls logging.basicConfig, which a handler already on the root logger stops
    guard = logging.NullHandler()
    logging.getLogger().addHandler(guard)
    theirs.instrument(set_logging_format=True)
    try:
        factory = logging.getLogRecordFactory()  # theirs: it sets the fields as it makes one
        expected = _fields_seen(lambda: factory("n", logging.INFO, "", 0, "m", (), None))
    finally:
        theirs.uninstrument()
        logging.getLogger().removeHandler(guard)

    def filtered() -> logging.LogRecord:
        record = logging.makeLogRecord({"msg": "m"})
        assert debug.ContextFilter().filter(record)
        return record

    assert _fields_seen(filtered) == expected
    assert expected[0]["otelSpanID"] == "0" and expected[1]["otelSpanID"] == "<span id>"
