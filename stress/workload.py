"""The stress harness: requests, per-task checks, tallies, and the task functions.

A *request* is what a submitter does before handing work out: it starts a span, puts
its request id in the baggage, in a registered ContextVar (`REQUEST_ID`, which crosses
to processes) and in an unregistered one (`UNREGISTERED`, threads only). Its
`Expected` is what every task submitted from it must see; `check` compares, in the
task, and returns the mismatches it found instead of raising, so one run counts all
of them. Then the task dirties its own context, so a leak into the next task on the
same worker shows up as that task's mismatch (I2).

Every wait here is bounded by a `Deadline` that counts from the last progress (a task
checked, a request entered, a future resolved, a thread ended), not from the start: a
slow machine that keeps moving never runs one out. One that does is a *stall*, tallied
apart from the mismatches.

Imported by spawn and forkserver workers too: keep it free of pytest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import os
import random
import socket
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar

from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

import propagate

TRACER = trace.get_tracer("stress")
BAGGAGE_KEY = "stress.request"
REQUEST_ID: ContextVar[str | None] = propagate.register(
    ContextVar("stress.request_id", default=None))
UNREGISTERED: ContextVar[str | None] = ContextVar("stress.unregistered", default=None)
WAIT = float(os.environ.get("STRESS_WAIT", "120"))  # seconds without progress: a stall
HARD = 10  # and, progress or not, a wait gives up after HARD times its stall bound
POLL = 0.5  # seconds: how often a wait looks at the progress clock
KEEP = 10  # mismatches (and stalls) kept for the report; the rest are only counted
TIMEOUTS = (TimeoutError, cf.TimeoutError)  # distinct before Python 3.11

T = TypeVar("T")

# How the task's current span relates to the submitter's.
PLAIN = "plain"  # it is the submitter's span (or, in a process, its remote copy)
CHILD = "child"  # it is propagate's task span, a child of the submitter's (task_spans=True)
LINKED = "linked"  # it is propagate's task span, a new root linked to it (link=True)

Outcome = tuple[int, tuple[str, ...]]  # (tasks checked, mismatches found)


class Progress:
    """When this process last moved: a task checked, a request entered, a wait's item done.

    Every `Deadline` counts from the later of its own progress and this clock's, so a
    wait for one slow future does not run out while the rest of the workload moves.
    """

    def __init__(self) -> None:
        self.last = time.monotonic()

    def note(self) -> None:
        self.last = time.monotonic()  # one attribute store: atomic, and cheap per task


PROGRESS = Progress()


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
    PROGRESS.note()  # a submitter that enters requests is moving
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
    PROGRESS.note()
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
        last = result(_inner_pool().submit(thread_task, inner), "process -> thread")
        back = intact(inner, "process (nested)")
    return merge(first, last, back)


def thread_then_process(exp: Expected, pool: cf.Executor, mode: str = PLAIN,
                        span_name: str | None = None) -> Outcome:
    """In a thread: check, open a span and a new request id, hand on to a process pool."""
    first = check(exp, "thread (nested)")
    with deeper(exp, "/t") as inner:
        fn = nested_in_process if mode == PLAIN else thread_task
        future = pool.submit(fn, inner.through(mode, span_name, process=True))
        last = result(future, "thread -> process")
        back = intact(inner, "thread (nested)")
    return merge(first, last, back)


def thread_then_thread(exp: Expected, pool: cf.Executor) -> Outcome:
    """In a thread: check, open a span and a new request id, hand on to another thread pool."""
    first = check(exp, "thread (nested)")
    with deeper(exp, "/t") as inner:
        last = result(pool.submit(thread_task, inner), "thread -> thread")
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
        deadline = Deadline()
        if self.gate is not None and not until(self.gate.wait, deadline):
            raise Stalled(f"the lookup gate was never opened: {deadline.why()}")
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
    """Tasks checked, mismatches and stalls found, from any thread; keeps the first `KEEP`.

    A *mismatch* is a wrong context or a broken expectation (a lost future, an unexpected
    exception); a *stall* is a wait that ran out (see `Deadline`). Both fail the workload,
    but a stall says that something hung, not that a context was wrong.
    """

    def __init__(self) -> None:
        self.tasks = 0
        self.mismatches = 0
        self.stalls = 0
        self.first: list[str] = []
        self.first_stalls: list[str] = []
        self._lock = threading.Lock()

    def add(self, outcome: Outcome) -> None:
        tasks, problems = outcome
        with self._lock:
            self.tasks += tasks
            if problems:
                self.mismatches += len(problems)
                self.first.extend(problems[:KEEP - len(self.first)])

    def problem(self, text: str) -> None:
        """A failure of the harness's own expectations (a lost future, an unexpected error)."""
        self.add((0, (text,)))

    def stall(self, text: str) -> None:
        """A wait that ran out: ``text`` says what was still pending, and why it gave up."""
        with self._lock:
            self.stalls += 1
            if len(self.first_stalls) < KEEP:
                self.first_stalls.append(text)

    def absorb(self, other: Tally) -> None:
        self.add((other.tasks, tuple(other.first)))
        for text in other.first_stalls:
            self.stall(text)
        with self._lock:  # the ones `other` only counted
            self.mismatches += other.mismatches - len(other.first)
            self.stalls += other.stalls - len(other.first_stalls)


# -- bounded waits ---------------------------------------------------------------------------


class Stalled(TimeoutError):
    """A wait of the harness ran out (see `Deadline`): a hang, not a wrong context.

    A `TimeoutError`, so it pickles home from a worker process like any other.
    """


def said(error: BaseException | None) -> str:
    """A timeout for the report: a `Stalled` says what it waited for; others by their repr."""
    return str(error) if isinstance(error, Stalled) else repr(error)


class Deadline:
    """The bound on one wait: ``stall`` seconds without progress, or ``hard`` in all.

    Progress is the wait's own (`moved`: an item it waits for is done) or any on ``clock``
    (this process's: a task checked, a request entered), so a slow machine that keeps
    moving never runs a deadline out; only a stall of ``stall`` seconds does. The hard
    bound (`HARD` times ``stall`` unless given) keeps a wait that moves for ever bounded.
    """

    def __init__(self, stall: float = WAIT, hard: float | None = None,
                 clock: Progress = PROGRESS) -> None:
        self.stall = stall
        self.hard = HARD * stall if hard is None else hard
        self.clock = clock
        self.began = self.last = time.monotonic()

    def moved(self) -> None:
        """Something this wait waits for is done: the deadline moves on (and the clock's)."""
        self.last = time.monotonic()
        self.clock.note()

    def left(self) -> float:
        """Seconds before this deadline runs out; 0 once it has."""
        since = max(self.last, self.clock.last)
        return max(0.0, min(since + self.stall, self.began + self.hard) - time.monotonic())

    def why(self) -> str:
        """Why it ran out: the hard bound on a wait that kept moving, or a stall."""
        now = time.monotonic()
        if now >= self.began + self.hard:
            return f"still pending after the hard bound of {self.hard:.1f} s, though moving"
        quiet = now - max(self.last, self.clock.last)  # progress may come after left() said 0
        return f"no progress for {max(quiet, self.stall):.1f} s"


def until(step: Callable[[float], object], deadline: Deadline | None = None) -> bool:
    """Call ``step(seconds)``, a bounded wait that returns true once its event happened, in
    slices of at most `POLL`, until it does (True) or ``deadline`` runs out (False)."""
    deadline = deadline or Deadline()
    while True:
        left = deadline.left()
        if left <= 0:
            return False
        if step(min(left, POLL)):
            deadline.moved()
            return True


def _outwait(items: Sequence[T], wait: Callable[[T, float], object],
             done: Callable[[T], bool], deadline: Deadline) -> list[T]:
    """Wait for each item in turn, in slices of at most `POLL`; return those left undone
    when ``deadline`` runs out (none if all are done).

    Each item done is progress, and so are items further on that finish meanwhile, in
    any order: those left are counted after each slice that runs out. The first slice
    on an item is short and only sets the count to compare with: most items are done
    by then, and a count costs a pass over the rest.
    """
    for index, item in enumerate(items):
        undone = None  # items from here on not done, at the last count
        while not done(item):
            left = deadline.left()
            if left <= 0:
                return [i for i in items[index:] if not done(i)]
            wait(item, min(left, POLL if undone is not None else POLL / 10))
            if not done(item):
                now = sum(1 for i in items[index:] if not done(i))
                if undone is not None and now < undone:
                    deadline.moved()
                undone = now
        deadline.moved()
    return []


def _exception(future: cf.Future[Any], seconds: float) -> None:
    try:
        future.exception(timeout=seconds)
    except (cf.CancelledError, *TIMEOUTS):
        pass


def unresolved(futures: Iterable[cf.Future[Any]], stall: float = WAIT,
               deadline: Deadline | None = None) -> list[cf.Future[Any]]:
    """Wait (bounded by ``deadline``, else a `Deadline` of ``stall``) until every future is
    done; return those that are not.

    Not ``concurrent.futures.wait``: it never counts a future that a pool's
    ``shutdown(cancel_futures=True)`` cancelled as done, and would wait for ever
    (CPython gh-109934, gh-136655). ``Future.exception(timeout)`` does.
    """
    return _outwait(list(futures), _exception, cf.Future.done, deadline or Deadline(stall))


def resolve(futures: Iterable[cf.Future[Any]], tally: Tally, where: str,
            stall: float = WAIT) -> list[cf.Future[Any]]:
    """`unresolved`, tallying a stall that names what was left; returns those left."""
    futures = list(futures)
    deadline = Deadline(stall)
    pending = unresolved(futures, deadline=deadline)
    if pending:
        tally.stall(f"{where}: {pending_futures(pending, len(futures))}; {deadline.why()}")
    return pending


def pending_futures(pending: Sequence[cf.Future[Any]], total: int) -> str:
    running = sum(1 for f in pending if f.running())
    return (f"{len(pending)} of {total} futures unresolved ({running} running, "
            f"{len(pending) - running} queued)")


def settle(futures: Iterable[cf.Future[Any]], tally: Tally, where: str,
           stall: float = WAIT) -> None:
    """Wait (bounded) for every future and tally its outcome: a future left unresolved or
    a `TimeoutError` is a stall; any other exception, or a cancellation, a mismatch."""
    futures = list(futures)
    pending = resolve(futures, tally, where, stall)
    for future in pending:
        future.cancel()
    for future in futures:
        if future in pending:
            continue
        if future.cancelled():
            tally.problem(f"{where}: a future was cancelled")
        elif isinstance(future.exception(), TIMEOUTS):
            tally.stall(f"{where}: {said(future.exception())}")
        elif future.exception() is not None:
            tally.problem(f"{where}: {future.exception()!r}")
        else:
            tally.add(future.result())


def result(future: cf.Future[T], where: str, stall: float = WAIT) -> T:
    """``future.result()``, bounded by a `Deadline`; `Stalled` if it runs out."""
    deadline = Deadline(stall)
    if unresolved([future], deadline=deadline):
        future.cancel()
        raise Stalled(f"{where}: {pending_futures([future], 1)}; {deadline.why()}")
    return future.result()


def mapped(pool: cf.Executor, fn: Callable[..., Outcome], items: Sequence[Any], tally: Tally,
           where: str, chunksize: int = 1, stall: float = WAIT) -> None:
    """``pool.map(fn, items)``, each outcome tallied.

    ``Executor.map`` takes only a deadline counted from its call, not from progress: it
    gets the hard bound (`HARD` times ``stall``), and running out of it is a stall.
    """
    bound = HARD * stall
    try:
        for outcome in pool.map(fn, items, timeout=bound, chunksize=chunksize):
            tally.add(outcome)
    except TIMEOUTS:
        tally.stall(f"{where}: map of {len(items)} items unfinished after the hard bound of "
                    f"{bound:.1f} s")


def joined(threads: Sequence[threading.Thread],
           deadline: Deadline | None = None) -> list[threading.Thread]:
    """Join ``threads`` (bounded: each that ends is progress); return those still running."""
    return _outwait(list(threads), threading.Thread.join, lambda t: not t.is_alive(),
                    deadline or Deadline())


def join(threads: Sequence[threading.Thread], tally: Tally, where: str,
         stall: float = WAIT) -> list[threading.Thread]:
    """`joined`, tallying a stall that names the threads left and where each is."""
    deadline = Deadline(stall)
    alive = joined(threads, deadline)
    if alive:
        tally.stall(f"{where}: {len(alive)} of {len(threads)} threads still running; "
                    f"{deadline.why()}: {running(alive)}")
    return alive


def running(threads: Sequence[threading.Thread]) -> str:
    """Threads, each with where it is now (its innermost frames): what a stall waited on."""
    frames = sys._current_frames()
    return "; ".join(f"{t.name} at {_where(frames.get(t.ident or 0))}" for t in threads[:KEEP])


def _where(frame: Any) -> str:
    if frame is None:
        return "?"
    stack = traceback.extract_stack(frame)[-3:]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                       for f in reversed(stack))


async def watched(awaitable: Awaitable[T], what: str, stall: float = WAIT,
                  hard: float | None = None) -> T:
    """Await ``awaitable``, bounded by a `Deadline` on this process's progress clock.

    ``asyncio.wait_for`` counts from the start; this counts from the last progress. If it
    runs out, ``awaitable`` is cancelled and `Stalled` raised.
    """
    task = asyncio.ensure_future(awaitable)
    deadline = Deadline(stall, hard)
    try:
        while not task.done():
            left = deadline.left()
            if left <= 0:
                task.cancel()
                await asyncio.wait({task}, timeout=POLL)  # let it unwind, but bounded
                raise Stalled(f"{what}: {deadline.why()}")
            await asyncio.wait({task}, timeout=min(left, POLL))
    except asyncio.CancelledError:
        task.cancel()
        raise
    return task.result()


def run_async(main: Awaitable[T], tally: Tally, where: str,
              hard: float | None = None) -> T | None:
    """``asyncio.run(main)``, bounded by `watched`; a stall in it is tallied (then None)."""
    async def bounded() -> T:
        return await watched(main, where, hard=hard)

    try:
        return asyncio.run(bounded())
    except Stalled as exc:
        tally.stall(str(exc))
        return None


def submitters(count: int, seed: int, body: Callable[[int, random.Random], None],
               tally: Tally, stall: float = WAIT, hard: float | None = None) -> None:
    """Run ``body(index, rng)`` on ``count`` plain threads at once; bounded; errors tallied.

    The join is bounded by a `Deadline`: a submitter that ends is progress, and so is
    every request it enters and every task checked, so slow submitters that move are
    waited for; a `TimeoutError` out of ``body`` is a stall, any other error a mismatch.
    """
    go = threading.Event()

    def guarded(index: int) -> None:
        try:
            if not until(go.wait, Deadline(stall)):
                raise Stalled("never released to start")
            body(index, random.Random(f"{seed}-{index}"))
        except TIMEOUTS as exc:
            tally.stall(f"submitter {index}: {said(exc)}")
        except BaseException as exc:  # counted, and never an unhandled thread exception
            tally.problem(f"submitter {index} raised {exc!r}")

    threads = [threading.Thread(target=guarded, args=(i,), name=f"stress-submitter-{i}")
               for i in range(count)]
    try:
        for thread in threads:
            thread.start()
            PROGRESS.note()
    finally:
        go.set()  # all at once, as many as started
    deadline = Deadline(stall, hard)
    hung = joined(threads, deadline)
    if hung:
        tally.stall(f"submitters still running; {deadline.why()}: {running(hung)}")


# -- what the session checks around every workload -------------------------------------------


ENDS_ELSEWHERE = "stress.ends_elsewhere"  # a scope whose entering Context ended before its exit


PID = os.getpid()  # a forked worker has its own: spans with another were relayed


class Affinity(SpanProcessor):
    """Checks that every span started here ends on the thread that started it (I4).

    Except a span marked `ENDS_ELSEWHERE`: I4 binds a span to its entering thread only
    while its entering Context can still run there.

    Keeps only the spans still open (their id and thread) and counters: exporting a
    million spans to memory would itself be the leak the memory test looks for. A span
    that ends with another process's pid in its resource was relayed from a worker (I6),
    and must have gone through ``on_start`` here first.
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
        pid = span.resource.attributes.get("process.pid", PID)
        with self._lock:
            self.ended += 1
            if pid != PID:  # relayed: through on_start here, then on_end, once each (I6)
                name = span.name if started is not None else f"{span.name} (no on_start)"
                self.relayed[name] = self.relayed.get(name, 0) + 1
            elif started is None:
                self.relayed[f"{span.name} (never started here)"] = 1 + self.relayed.get(
                    f"{span.name} (never started here)", 0)
            elif (started[0] != threading.get_ident()
                  and not (span.attributes or {}).get(ENDS_ELSEWHERE)):
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


# -- relay_logs ----------------------------------------------------------------------------------

LOGS = logging.getLogger("stress.logs")


def log_lines(prefix: str, n: int) -> int:
    """In a worker: log ``n`` numbered INFO lines inside a span; return its span id."""
    with TRACER.start_as_current_span("stress.logs") as span:
        for i in range(n):
            LOGS.info("%s %d", prefix, i)
        return span.get_span_context().span_id
