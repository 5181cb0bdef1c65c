"""Tools for finding context bugs: jitter, task lineage, live threads and tasks, a log filter.

* `jitter` sleeps at random, seeded, at propagate's switch points (capture, attach,
  detach, task start and end), to widen the races a test would otherwise rarely hit;
* `track_tasks` records which asyncio task created which, and `task_tree` draws them;
* `live` lists the threads, child processes and asyncio tasks still running, and
  `assert_quiescent` fails when any outlives a baseline;
* `ContextFilter` puts the current trace and span ids on every log record.

``import propagate`` loads it as ``propagate.debug``.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import math
import multiprocessing
import os
import random
import sys
import threading
import time
import types
import weakref
from collections.abc import Coroutine, Iterator
from concurrent.futures import thread as cf_thread
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from . import _otel, _switch

POINTS = ("capture", "attach", "detach", "task-start", "task-end")

# -- jitter --------------------------------------------------------------------------------


class Jitter:
    """The switch-point hook `jitter` installs: seeded sleeps, and counts to prove it fired.

    One ``random.Random(seed)`` draws every decision under a lock, so a given seed gives
    the same sequence of sleeps for the same order of calls.
    """

    def __init__(self, seed: int | str, probability: float, max_delay: float) -> None:
        if not 0.0 <= probability <= 1.0:  # also refuses NaN
            raise ValueError(f"probability must be between 0 and 1, not {probability!r}")
        if not (max_delay >= 0.0 and math.isfinite(max_delay)):
            raise ValueError(f"max_delay must be a finite number of seconds >= 0, "
                             f"not {max_delay!r}")
        self.seed, self.probability, self.max_delay = seed, probability, max_delay
        self.counts: dict[str, int] = dict.fromkeys(POINTS, 0)
        self.delays = 0  # how many sleeps were injected
        self.slept = 0.0  # their total, in seconds
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        _jitters.add(self)

    def __call__(self, point: str) -> None:
        with self._lock:
            self.counts[point] = self.counts.get(point, 0) + 1
            if self._random.random() >= self.probability:
                return
            delay = self._random.uniform(0.0, self.max_delay)
            self.delays += 1
            self.slept += delay
        time.sleep(delay)  # outside the lock: the point is to let other threads run

    def __repr__(self) -> str:
        return (f"<Jitter seed={self.seed!r} probability={self.probability} "
                f"max_delay={self.max_delay} delays={self.delays} counts={self.counts}>")


_jitters: weakref.WeakSet[Jitter] = weakref.WeakSet()


def _unlock_in_child() -> None:
    # A thread of the parent may have held a lock at fork: the child would wait forever.
    for hook in list(_jitters):
        hook._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_in_child)


@contextmanager
def jitter(seed: int | str = 0, probability: float = 0.5,
           max_delay: float = 0.001) -> Iterator[Jitter]:
    """Sleep at random at propagate's switch points while the block runs; yield the `Jitter`.

    At each point (``capture``, ``attach``, ``detach``, ``task-start``, ``task-end``),
    in any thread of this process, sleep with ``probability`` for a time drawn uniformly
    from ``[0, max_delay]`` seconds. The draws come from ``random.Random(seed)``, so a
    seed replays the same decisions for the same order of calls. Nested blocks replace
    the outer hook and restore it on exit. Worker processes started by fork while the
    block runs inherit it (their counts stay in the worker).
    """
    hook = Jitter(seed, probability, max_delay)
    previous, _switch.hook = _switch.hook, hook
    try:
        yield hook
    finally:
        _switch.hook = previous


# -- task lineage --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    order: int
    parent: weakref.ReferenceType[asyncio.Task[Any]] | None
    parent_name: str | None


_origins: weakref.WeakKeyDictionary[asyncio.Task[Any], _Origin] = weakref.WeakKeyDictionary()
_created = itertools.count()  # creation order

TaskFactory = Callable[..., "asyncio.Future[Any]"]


class _LineageFactory:
    """A task factory that records each task's creator, then defers to the previous factory."""

    def __init__(self, previous: TaskFactory | None) -> None:
        self.previous = previous

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                 **kwargs: Any) -> asyncio.Future[Any]:  # name= and context= on 3.11+
        if self.previous is None:
            task: asyncio.Future[Any] = asyncio.Task(coro, loop=loop, **kwargs)
        else:
            task = self.previous(loop, coro, **kwargs)
        if isinstance(task, asyncio.Task):
            parent = asyncio.current_task(loop)
            _origins[task] = _Origin(next(_created),
                                     None if parent is None else weakref.ref(parent),
                                     None if parent is None else parent.get_name())
        return task


def track_tasks(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Record, for every task created on ``loop`` from now on, the task that created it.

    ``loop`` defaults to the running loop. The loop's existing task factory, if any,
    still makes the tasks. Calling it again on the same loop does nothing.
    """
    loop = loop or asyncio.get_running_loop()
    previous = loop.get_task_factory()
    if not isinstance(previous, _LineageFactory):
        loop.set_task_factory(_LineageFactory(previous))  # type: ignore[arg-type]


def task_tree(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The live tasks of ``loop`` (default: the running loop), each indented under its creator.

    Only tasks created after `track_tasks` know their creator; a task whose creator has
    finished is shown at the top level with the creator's name.
    """
    tasks = asyncio.all_tasks(loop or asyncio.get_running_loop())
    children: dict[asyncio.Task[Any] | None, list[asyncio.Task[Any]]] = {}
    for task in tasks:
        origin = _origins.get(task)
        parent = None if origin is None or origin.parent is None else origin.parent()
        children.setdefault(parent if parent in tasks else None, []).append(task)
    lines: list[str] = []

    def draw(task: asyncio.Task[Any], depth: int) -> None:
        origin = _origins.get(task)
        note = ""
        if depth == 0 and origin is not None and origin.parent_name is not None:
            note = f" (created by {origin.parent_name}, finished)"
        lines.append("  " * depth + str(_task_info(task)) + note)
        for child in sorted(children.get(task, []), key=_order):
            draw(child, depth + 1)

    for root in sorted(children.get(None, []), key=_order):
        draw(root, 0)
    return "\n".join(lines)


def print_task_tree(loop: asyncio.AbstractEventLoop | None = None,
                    file: TextIO | None = None) -> None:
    """Print `task_tree` to ``file`` (default: standard error)."""
    print(task_tree(loop), file=file or sys.stderr)


def _order(task: asyncio.Task[Any]) -> tuple[int, str]:
    origin = _origins.get(task)
    return (-1 if origin is None else origin.order, task.get_name())


# -- live threads, processes and tasks -----------------------------------------------------


@dataclass(frozen=True)
class Running:
    """Something still running; ``ref`` is a weak reference to it (the thread, process, task)."""

    name: str
    ref: Callable[[], object] = field(repr=False, compare=False)


@dataclass(frozen=True)
class ThreadInfo(Running):
    """A thread. ``span`` is its current span's ``trace_id/span_id`` in hex, where observable."""

    ident: int | None = None
    daemon: bool = False
    span: str | None = None

    def __str__(self) -> str:
        kind = "daemon thread" if self.daemon else "thread"
        return f"{kind} {self.name!r} (ident {self.ident})" + _in_span(self.span)


@dataclass(frozen=True)
class ProcessInfo(Running):
    """A child process started by multiprocessing and not yet joined."""

    pid: int | None = None

    def __str__(self) -> str:
        return f"process {self.name!r} (pid {self.pid})"


@dataclass(frozen=True)
class TaskInfo(Running):
    """A pending task: its coroutine, where it waits (innermost frame outside asyncio), span."""

    coro: str = ""
    file: str | None = None
    line: int | None = None
    span: str | None = None  # Python 3.12+ only: older tasks do not expose their Context

    def __str__(self) -> str:
        where = f" at {self.file}:{self.line}" if self.file else ""
        return f"task {self.name!r} {self.coro}(){where}" + _in_span(self.span)


def _in_span(span: str | None) -> str:
    return f" in span {span}" if span else ""


@dataclass(frozen=True)
class Live:
    """What `live` saw: threads, child processes and pending asyncio tasks."""

    threads: tuple[ThreadInfo, ...]
    processes: tuple[ProcessInfo, ...]
    tasks: tuple[TaskInfo, ...]

    def __iter__(self) -> Iterator[Running]:
        return iter((*self.threads, *self.processes, *self.tasks))

    def __str__(self) -> str:
        return "\n".join(str(item) for item in self) or "nothing running"

    def beyond(self, baseline: Live | None) -> list[Running]:
        """What is here and was not in ``baseline`` (None: anything but the main thread)."""
        if baseline is None:
            return [item for item in self if item.ref() is not threading.main_thread()]
        # By identity: a thread ident or pid may be reused. Holding the live ones here
        # keeps their id() unique; a dead one matches nothing.
        alive = [k for k in (item.ref() for item in baseline) if k is not None]
        known = {id(k) for k in alive}
        return [item for item in self if id(item.ref()) not in known]


_WORK_ITEM_RUN = cf_thread._WorkItem.run.__code__
_ASYNCIO_DIR = os.path.dirname(asyncio.__file__) + os.sep


def live(loop: asyncio.AbstractEventLoop | None = None) -> Live:
    """The threads, multiprocessing children and pending asyncio tasks running now.

    Tasks are those of ``loop``, else of the running loop, else every pending task
    asyncio knows of in this process (loops in other threads, stopped loops).

    A thread's current span is known for the calling thread, for a running
    `propagate.Thread` or `Timer`, and for a pool worker while it runs a task bound to
    a snapshot (`propagate.ThreadPoolExecutor`, propagate's asyncio helpers,
    ``asyncio.to_thread``): their Context can be read from outside. Any other
    thread's span is None: another thread's context is not observable.
    """
    me = threading.current_thread()
    frames = sys._current_frames()
    threads = tuple(
        ThreadInfo(t.name, weakref.ref(t), t.ident, t.daemon,
                   _span_of(contextvars.copy_context() if t is me else _context_of(t, frames)))
        for t in threading.enumerate())
    processes = tuple(ProcessInfo(p.name, weakref.ref(p), p.pid)
                      for p in multiprocessing.active_children())
    tasks = tuple(_task_info(t) for t in _pending_tasks(loop) if t is not _current_task())
    return Live(threads, processes, tasks)


def assert_quiescent(baseline: Live | None = None, grace: float = 1.0) -> None:
    """Raise AssertionError listing the threads, processes and tasks not in ``baseline``.

    ``baseline`` is an earlier `live` snapshot; without one, anything but the main and
    calling threads counts. Waits up to ``grace`` seconds for threads and processes
    that are finishing. Tasks of a loop running in this thread cannot progress while
    this waits: call it after the loop, or ``await asyncio.sleep(0)`` first.
    """
    __tracebackhide__ = True  # pytest: the caller's line is the one to show
    deadline = time.monotonic() + grace
    while True:
        extra = [i for i in live().beyond(baseline) if i.ref() is not threading.current_thread()]
        if not extra or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    if extra:
        raise AssertionError("still running:\n" + "\n".join(f"  {item}" for item in extra))


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        return None


def _pending_tasks(loop: asyncio.AbstractEventLoop | None) -> list[asyncio.Task[Any]]:
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return _every_pending_task()
    return list(asyncio.all_tasks(loop))


def _every_pending_task() -> list[asyncio.Task[Any]]:
    """Pending tasks of every loop, from asyncio's registries (private; 3.9 to 3.13)."""
    found: list[asyncio.Task[Any]] = []
    for registry in ("_all_tasks", "_scheduled_tasks", "_eager_tasks"):
        tasks = getattr(asyncio.tasks, registry, ())
        for _ in range(100):  # another thread may add a task mid-copy, as asyncio.all_tasks knows
            try:
                found.extend(t for t in list(tasks) if not t.done())
                break
            except RuntimeError:
                continue
    return found


def _context_of(thread: threading.Thread, frames: dict[int, types.FrameType]
                ) -> contextvars.Context | None:
    """The Context ``thread`` runs a propagate task in, read from outside; None if unknown."""
    run = thread.__dict__.get("run")  # a running propagate.Thread's run_in_snapshot closure
    for cell in getattr(run, "__closure__", None) or ():
        try:
            held = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        held = getattr(held, "__self__", held)  # snapshot.run, bound to its Context
        if isinstance(held, contextvars.Context):
            return held
    frame = frames.get(thread.ident or 0)
    while frame is not None:  # a pool worker: _WorkItem.run runs snapshot.run(...)
        if frame.f_code is _WORK_ITEM_RUN:
            fn = getattr(frame.f_locals.get("self"), "fn", None)
            fn = getattr(fn, "func", fn)  # a partial, or the bound method itself
            ctx = getattr(fn, "__self__", None)
            return ctx if isinstance(ctx, contextvars.Context) else None
        frame = frame.f_back
    return None


def _span_of(ctx: contextvars.Context | None) -> str | None:
    # copy(): a Context entered in another thread cannot be entered here, a copy can
    identity = None if ctx is None else ctx.copy().run(_otel.current_identity)
    return None if identity is None else f"{identity[0]:032x}/{identity[1]:016x}"


def _task_info(task: asyncio.Task[Any]) -> TaskInfo:
    coro: Any = task.get_coro()
    name = getattr(coro, "__qualname__", type(coro).__qualname__)
    frame = None
    while coro is not None:  # down the await chain, to where the task is suspended
        f = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if f is None:
            break
        if frame is None or not f.f_code.co_filename.startswith(_ASYNCIO_DIR):
            frame = f
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    get_context = getattr(task, "get_context", None)
    span = _span_of(get_context()) if get_context is not None else None
    return TaskInfo(task.get_name(), weakref.ref(task), name,
                    None if frame is None else frame.f_code.co_filename,
                    None if frame is None else frame.f_lineno, span)


# -- doctor --------------------------------------------------------------------------------


def doctor(file: TextIO | None = None) -> None:
    """Like ``python -m propagate doctor``, but from inside this process.

    Call it in your application, where the tracer provider, the propagators, the loop's
    default executor and the registered ContextVars are the real ones, and paste the
    output into a bug report. Prints to ``file`` (default: standard output).
    """
    from ._doctor import main

    main(file)


# -- logging -------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Like `logging.Filter`, but it lets every record through, adding the current context.

    Adds ``trace_id`` (32 hex digits, ``"0" * 32`` outside any span), ``span_id`` (16 hex
    digits), ``thread_name`` and ``task_name`` (the asyncio task's name, ``"-"`` outside
    a task) to each record, as they are in the thread that logs. Put it on the handler
    (or on a ``QueueHandler``, which runs in the logging thread), then format with::

        "%(asctime)s %(levelname)s [%(trace_id)s/%(span_id)s %(thread_name)s] %(message)s"

    In propagate's thread and process pools, workers log their submitter's ids.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        identity = _otel.current_identity()
        record.trace_id = "0" * 32 if identity is None else f"{identity[0]:032x}"
        record.span_id = "0" * 16 if identity is None else f"{identity[1]:016x}"
        record.thread_name = threading.current_thread().name
        task = _current_task()
        record.task_name = "-" if task is None else task.get_name()
        return True


__all__ = [
    "Jitter", "jitter", "POINTS",
    "track_tasks", "task_tree", "print_task_tree",
    "live", "assert_quiescent", "Live", "Running", "ThreadInfo", "ProcessInfo", "TaskInfo",
    "ContextFilter", "doctor",
]
