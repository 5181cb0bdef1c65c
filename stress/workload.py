"""The stress harness: requests, per-task checks, tallies, and the task functions.

A *request* is what a submitter does before handing work out: it starts a span, puts
its request id in the baggage, in a registered ContextVar (`REQUEST_ID`, which crosses
to processes) and in an unregistered one (`UNREGISTERED`, threads only). Its
`Expected` is what every task submitted from it must see; `check` compares, in the
task, and returns the mismatches it found instead of raising, so one run counts all
of them. Then the task dirties its own context, so a leak into the next task on the
same worker shows up as that task's mismatch (I2).

Imported by spawn and forkserver workers too: keep it free of pytest.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

import propagate

TRACER = trace.get_tracer("stress")
BAGGAGE_KEY = "stress.request"
REQUEST_ID: ContextVar[str | None] = propagate.register(
    ContextVar("stress.request_id", default=None))
UNREGISTERED: ContextVar[str | None] = ContextVar("stress.unregistered", default=None)
WAIT = float(os.environ.get("STRESS_WAIT", "120"))  # seconds: the bound on every wait
KEEP = 10  # mismatches kept for the report; the rest are only counted

# How the task's current span relates to the submitter's.
PLAIN = "plain"  # it is the submitter's span (or, in a process, its remote copy)
CHILD = "child"  # it is propagate's task span, a child of the submitter's (task_spans=True)
LINKED = "linked"  # it is propagate's task span, a new root linked to it (link=True)

Outcome = tuple[int, tuple[str, ...]]  # (tasks checked, mismatches found)


class Expected(NamedTuple):
    """What a task must see: its submitter's context at submit time (picklable)."""

    request_id: str
    trace_id: int
    span_id: int
    unregistered: str | None  # None: must be unset (processes do not carry it)
    mode: str = PLAIN
    span_name: str | None = None  # propagate's task span name, in CHILD and LINKED modes

    def through(self, mode: str = PLAIN, span_name: str | None = None,
                process: bool = False) -> Expected:
        """The same request as seen through a pool with task spans, or in another process."""
        return self._replace(mode=mode, span_name=span_name,
                             unregistered=None if process else self.unregistered)


# -- the submitter's side --------------------------------------------------------------------


@contextmanager
def request(request_id: str, scoped: bool = False) -> Iterator[Expected]:
    """Enter a request: a span (``propagate.span`` if ``scoped``), baggage, both variables."""
    scope = (propagate.span("stress.request") if scoped
             else TRACER.start_as_current_span("stress.request"))
    with scope as span:
        token = otel_context.attach(baggage.set_baggage(BAGGAGE_KEY, request_id))
        rid, unreg = REQUEST_ID.set(request_id), UNREGISTERED.set(request_id)
        try:
            sc = span.get_span_context()
            yield Expected(request_id, sc.trace_id, sc.span_id, request_id)
        finally:
            UNREGISTERED.reset(unreg)
            REQUEST_ID.reset(rid)
            otel_context.detach(token)


def intact(exp: Expected, where: str) -> Outcome:
    """The submitter's own check, after its tasks ran: nothing flowed back (I2)."""
    sc = trace.get_current_span().get_span_context()
    seen = (sc.trace_id, sc.span_id, baggage.get_baggage(BAGGAGE_KEY), REQUEST_ID.get(),
            UNREGISTERED.get())
    want = (exp.trace_id, exp.span_id, exp.request_id, exp.request_id, exp.unregistered)
    if seen == want:
        return (1, ())
    return (1, (f"{where}: submitter of {exp.request_id} changed by its tasks: "
                f"saw {_show(seen)}",))


# -- the task's side -------------------------------------------------------------------------


def check(exp: Expected, where: str) -> Outcome:
    """In a task: compare what it sees with ``exp``; then dirty the context (see module doc)."""
    span = trace.get_current_span()
    sc = span.get_span_context()
    problems = _current_span_problems(exp, span)
    with TRACER.start_as_current_span("stress.task") as own:
        parent = own.parent  # type: ignore[attr-defined]
        if parent is None or (parent.trace_id, parent.span_id) != (sc.trace_id, sc.span_id):
            problems.append(f"own span's parent {_ids(parent)}, current span was {_ids(sc)}")
    seen = (baggage.get_baggage(BAGGAGE_KEY), REQUEST_ID.get(), UNREGISTERED.get())
    want = (exp.request_id, exp.request_id, exp.unregistered)
    if seen != want:
        problems.append(f"baggage/request_id/unregistered {_show(seen)}, want {_show(want)}")
    dirty()
    if not problems:
        return (1, ())
    return (1, (f"{where} [pid {os.getpid()} {threading.current_thread().name}]: "
                f"request {exp.request_id}: " + "; ".join(problems),))


def _current_span_problems(exp: Expected, span: trace.Span) -> list[str]:
    sc = span.get_span_context()
    if exp.mode == PLAIN:
        if (sc.trace_id, sc.span_id) == (exp.trace_id, exp.span_id):
            return []
        return [f"current span {_ids(sc)}, want {exp.trace_id:032x}/{exp.span_id:016x}"]
    problems = []
    name, parent = getattr(span, "name", None), getattr(span, "parent", None)
    if name != exp.span_name:
        problems.append(f"task span named {name!r}, want {exp.span_name!r}")
    if exp.mode == CHILD:
        if parent is None or (parent.trace_id, parent.span_id) != (exp.trace_id, exp.span_id):
            problems.append(f"task span's parent {_ids(parent)}, want the submitter's")
    else:
        links = [(lk.context.trace_id, lk.context.span_id) for lk in getattr(span, "links", ())]
        if parent is not None or links != [(exp.trace_id, exp.span_id)]:
            problems.append(f"linked task span has parent {_ids(parent)}, links {links}")
    return problems


def dirty() -> None:
    """Leave junk in this task's context, unreset, as careless task code does."""
    REQUEST_ID.set("dirty")
    UNREGISTERED.set("dirty")
    otel_context.attach(baggage.set_baggage(BAGGAGE_KEY, "dirty"))


def _ids(sc: Any) -> str:
    return "none" if sc is None else f"{sc.trace_id:032x}/{sc.span_id:016x}"


def _show(values: Sequence[object]) -> str:
    return "(" + ", ".join(f"{v:x}" if isinstance(v, int) else repr(v) for v in values) + ")"


# -- task functions (module level: process workers import them by name) --------------------


def thread_task(exp: Expected) -> Outcome:
    """The leaf task: check and return."""
    return check(exp, "task")


def attached_task(detached: propagate.DetachedContext, exp: Expected) -> Outcome:
    """In any thread, in an empty Context: attach a detached context, check, leave it.

    After ``attach()`` exits, what it set (span, baggage, registered variable) is gone,
    even though the task changed all three inside.
    """
    with detached.attach():
        outcome = check(exp, "DetachedContext.attach")
    seen = (trace.get_current_span().get_span_context().is_valid,
            baggage.get_baggage(BAGGAGE_KEY), REQUEST_ID.get())
    if seen == (False, None, None):
        return outcome
    return merge(outcome, (0, (f"after attach() of {exp.request_id}: left {_show(seen)}",)))


class StressError(Exception):
    """The user's exception, raised on purpose by `failing_task`."""


def failing_task(exp: Expected) -> Outcome:
    """Check, then raise `StressError` carrying the request id (it must arrive unchanged)."""
    outcome = check(exp, "failing task")
    raise StressError(exp.request_id, outcome)


def slow_task(exp: Expected, seconds: float, marker: str | None = None) -> Outcome:
    """Check, touch ``marker`` (the parent may now kill us), then sleep ``seconds``."""
    outcome = check(exp, "slow task")
    if marker is not None:
        with open(f"{marker}.{os.getpid()}", "w"):
            pass
    time.sleep(seconds)
    return outcome


_inner_pools: dict[int, propagate.ThreadPoolExecutor] = {}  # by pid: one per worker process
_inner_lock = threading.Lock()


def _inner_pool() -> propagate.ThreadPoolExecutor:
    with _inner_lock:
        pool = _inner_pools.get(os.getpid())
        if pool is None:
            pool = _inner_pools[os.getpid()] = propagate.ThreadPoolExecutor(
                2, thread_name_prefix="stress-inner")
        return pool


def nested_in_process(exp: Expected) -> Outcome:
    """In a worker process: check, open a span and a new request id, hand on to a thread."""
    first = check(exp, "process (nested)")
    with deeper(exp, "/p") as inner:
        future = _inner_pool().submit(thread_task, inner)
        last = future.result(timeout=WAIT)
        back = intact(inner, "process (nested)")
    return merge(first, last, back)


def thread_then_process(exp: Expected, pool: cf.Executor, mode: str = PLAIN,
                        span_name: str | None = None) -> Outcome:
    """In a thread: check, open a span and a new request id, hand on to a process pool."""
    first = check(exp, "thread (nested)")
    with deeper(exp, "/t") as inner:
        fn = nested_in_process if mode == PLAIN else thread_task
        future = pool.submit(fn, inner.through(mode, span_name, process=True))
        last = future.result(timeout=WAIT)
        back = intact(inner, "thread (nested)")
    return merge(first, last, back)


def thread_then_thread(exp: Expected, pool: cf.Executor) -> Outcome:
    """In a thread: check, open a span and a new request id, hand on to another thread pool."""
    first = check(exp, "thread (nested)")
    with deeper(exp, "/t") as inner:
        last = pool.submit(thread_task, inner).result(timeout=WAIT)
        back = intact(inner, "thread (nested)")
    return merge(first, last, back)


@contextmanager
def deeper(exp: Expected, suffix: str) -> Iterator[Expected]:
    """A request nested in a task: a child span, and a request id derived from the outer one.

    The task's context was dirtied by `check`; this sets every field afresh.
    """
    with request(exp.request_id + suffix) as inner:
        yield inner


def merge(*outcomes: Outcome) -> Outcome:
    return (sum(n for n, _ in outcomes), tuple(p for _, ps in outcomes for p in ps))


# -- DNS -------------------------------------------------------------------------------------


class CheckingLookup:
    """A resolver's ``getaddrinfo``: checks the lookup thread's context, then really resolves.

    The caller's `Expected` travels by port number, the one thing of the question that is
    not context: `ask` books a port for it. On the lookup thread, the current span must be
    the resolver's ``dns.lookup`` span, a child of the caller's span, with the caller's
    baggage and variables around it. ``gate`` (optional) holds lookups until it is set.
    """

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.tally = Tally()
        self.entered = threading.Semaphore(0)  # released once per lookup that started
        self._booked: dict[int, Expected] = {}
        self._next = 0
        self._lock = threading.Lock()

    def ask(self, exp: Expected) -> int:
        """A port to look up for ``exp``: unique among the lookups in flight."""
        with self._lock:
            while True:
                self._next = self._next % 60000 + 1
                if self._next not in self._booked:
                    self._booked[self._next] = exp
                    return self._next

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                 flags: int = 0) -> list[Any]:
        self.entered.release()
        with self._lock:
            exp = self._booked.pop(port)
        self.tally.add(self._check(exp))
        if self.gate is not None and not self.gate.wait(WAIT):
            raise TimeoutError("the lookup gate was never opened")
        return socket.getaddrinfo("localhost", port, family, type, proto, flags)

    def _check(self, exp: Expected) -> Outcome:
        span = trace.get_current_span()
        parent = getattr(span, "parent", None)
        seen = (getattr(span, "name", None), _ids(parent), baggage.get_baggage(BAGGAGE_KEY),
                REQUEST_ID.get(), UNREGISTERED.get())
        want = ("dns.lookup", f"{exp.trace_id:032x}/{exp.span_id:016x}", exp.request_id,
                exp.request_id, exp.unregistered)
        if seen == want:
            return (1, ())
        return (1, (f"dns.lookup [{threading.current_thread().name}]: request "
                    f"{exp.request_id}: saw {_show(seen)}, want {_show(want)}",))


# -- counting --------------------------------------------------------------------------------


class Tally:
    """Tasks checked and mismatches found, from any thread; keeps the first `KEEP` of them."""

    def __init__(self) -> None:
        self.tasks = 0
        self.mismatches = 0
        self.first: list[str] = []
        self._lock = threading.Lock()

    def add(self, outcome: Outcome) -> None:
        tasks, problems = outcome
        with self._lock:
            self.tasks += tasks
            if problems:
                self.mismatches += len(problems)
                self.first.extend(problems[:KEEP - len(self.first)])

    def problem(self, text: str) -> None:
        """A failure of the harness's own expectations (a lost future, a hang): a mismatch."""
        self.add((0, (text,)))

    def absorb(self, other: Tally) -> None:
        self.add((other.tasks, tuple(other.first)))
        with self._lock:  # the ones `other` only counted
            self.mismatches += other.mismatches - len(other.first)


def unresolved(futures: Iterable[cf.Future[Any]], timeout: float = WAIT) -> list[cf.Future[Any]]:
    """Wait (bounded) until every future is done; return those that are not.

    Not ``concurrent.futures.wait``: it never counts a future that a pool's
    ``shutdown(cancel_futures=True)`` cancelled as done, and would wait for ever
    (CPython gh-109934, gh-136655). ``Future.exception(timeout)`` does.
    """
    deadline = time.monotonic() + timeout
    left = []
    for future in futures:
        try:
            future.exception(timeout=max(0.0, deadline - time.monotonic()))
        except cf.CancelledError:
            pass
        except cf.TimeoutError:
            left.append(future)
    return left


def settle(futures: Iterable[cf.Future[Any]], tally: Tally, where: str,
           timeout: float = WAIT) -> None:
    """Wait (bounded) for every future and tally its outcome; an exception is a mismatch."""
    futures = list(futures)
    pending = unresolved(futures, timeout)
    for future in pending:
        future.cancel()
    if pending:
        tally.problem(f"{where}: {len(pending)} of {len(futures)} futures unresolved "
                      f"after {timeout} s")
    for future in futures:
        if future in pending:
            continue
        if future.cancelled():
            tally.problem(f"{where}: a future was cancelled")
        elif future.exception() is not None:
            tally.problem(f"{where}: {future.exception()!r}")
        else:
            tally.add(future.result())


def submitters(count: int, seed: int, body: Callable[[int, random.Random], None],
               tally: Tally, timeout: float = WAIT) -> None:
    """Run ``body(index, rng)`` on ``count`` plain threads at once; bounded; errors tallied."""
    start = threading.Barrier(count, timeout=timeout)

    def guarded(index: int) -> None:
        try:
            start.wait()
            body(index, random.Random(f"{seed}-{index}"))
        except BaseException as exc:  # counted, and never an unhandled thread exception
            tally.problem(f"submitter {index} raised {exc!r}")

    threads = [threading.Thread(target=guarded, args=(i,), name=f"stress-submitter-{i}")
               for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    hung = [t.name for t in threads if t.is_alive()]
    if hung:
        tally.problem(f"submitters still running after {timeout} s: {hung}")


# -- what the session checks around every workload -------------------------------------------


class Affinity(SpanProcessor):
    """Checks that every span started here ends on the thread that started it (I4).

    Keeps only the spans still open (their id and thread) and counters: exporting a
    million spans to memory would itself be the leak the memory test looks for. A span
    that ends without having started here was relayed from a worker process (I6).
    """

    def __init__(self) -> None:
        self.open: dict[int, tuple[int, str]] = {}
        self.ended = 0
        self.relayed: dict[str, int] = {}
        self.wrong_thread = 0
        self.first: list[str] = []
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.open[span.context.span_id] = (threading.get_ident(), span.name)

    def on_end(self, span: ReadableSpan) -> None:
        started = self.open.pop(span.context.span_id, None)  # type: ignore[union-attr]
        with self._lock:
            self.ended += 1
            if started is None:
                self.relayed[span.name] = self.relayed.get(span.name, 0) + 1
            elif started[0] != threading.get_ident():
                self.wrong_thread += 1
                if len(self.first) < KEEP:
                    self.first.append(f"span {span.name!r} started on thread {started[0]}, "
                                      f"ended on {threading.current_thread().name}")

    def figures(self) -> dict[str, Any]:
        with self._lock:
            return {"ended": self.ended, "relayed": dict(self.relayed),
                    "wrong_thread": self.wrong_thread, "open": set(self.open)}


class DetachFailures(logging.Handler):
    """Counts "Failed to detach context" records on the ``opentelemetry.context`` logger (I4)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.first: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        if "Failed to detach context" in record.getMessage():
            self.count += 1
            if len(self.first) < KEEP:
                error = record.exc_info[1] if record.exc_info else None
                self.first.append(f"{record.threadName}: {record.getMessage()} {error!r}")
