"""What is still running: threads, child processes and asyncio tasks, with their spans."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import multiprocessing
import os
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import _otel, _private


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
    tasks = tuple(task_info(t) for t in _pending_tasks(loop) if t is not current_task())
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


def current_task() -> asyncio.Task[Any] | None:
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
    """Pending tasks of every open loop in this process, through the public ``all_tasks``.

    asyncio has no registry of loops, and from 3.14 its C tasks are in no registry that
    Python can read: the loops are found as the referrers of the loop classes (every
    instance of a Python class refers to it), which costs a few ms on a large heap.
    """
    classes = _subclasses(asyncio.AbstractEventLoop)
    loops = [obj for obj in gc.get_referrers(*classes) if type(obj) in classes]
    return [task for loop in loops if not loop.is_closed() for task in asyncio.all_tasks(loop)]


def _subclasses(cls: type) -> set[type]:
    found: set[type] = {cls}
    todo: list[type] = [cls]
    while todo:
        subclasses: list[type] = todo.pop().__subclasses__()
        for sub in subclasses:
            if sub not in found:
                found.add(sub)
                todo.append(sub)
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
        fn = _private.work_item_callable(frame)
        if fn is not None:
            fn = getattr(fn, "func", fn)  # a partial, or the bound method itself
            ctx = getattr(fn, "__self__", None)
            return ctx if isinstance(ctx, contextvars.Context) else None
        frame = frame.f_back
    return None


def _span_of(ctx: contextvars.Context | None) -> str | None:
    # copy(): a Context entered in another thread cannot be entered here, a copy can
    identity = None if ctx is None else ctx.copy().run(_otel.current_identity)
    return None if identity is None else f"{identity[0]:032x}/{identity[1]:016x}"


def task_info(task: asyncio.Task[Any]) -> TaskInfo:
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
