"""Threads that start in their creator's context: the pool, Thread, Timer and wrap."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from . import _private, _switch
from ._executor import (
    INHERITS,
    PLAIN,
    Binding,
    Options,
    bind_snapshot,
    settled,
    snapshot,
    submit_from_empty_context,
)

P = ParamSpec("P")

T = TypeVar("T")


class ThreadPoolExecutor(cf.ThreadPoolExecutor, Binding):
    """Like `concurrent.futures.ThreadPoolExecutor`, but each task runs in the submitter's context.

    ``submit`` takes a snapshot of the caller's context (every ContextVar, and with it
    the current OpenTelemetry span and baggage) and the task runs in that snapshot.
    Changes a task makes stay in its snapshot: they never reach the submitter, the next
    task, or the worker thread. A worker thread created by one ``submit`` keeps no trace
    of that submitter's context.

    ``task_spans=True`` gives each task a span named after the callable, started and
    ended on the worker thread, with ``thread.id``, ``thread.name``, ``process.pid`` and
    ``propagate.queue_seconds``. ``link=True`` implies ``task_spans=True`` (the link needs
    a span to live on) and makes that span the root of a new trace, linked to the
    submitter's span, for background work that must not stretch the caller's trace. Both
    must be bools: anything else raises `TypeError` here, at construction.

    Every parameter of the stdlib's constructor is kept, ``**ctxkwargs`` (3.14+) included.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        task_spans: bool = False,
        link: bool = False,
        **ctxkwargs: Any,
    ) -> None:
        super().__init__(max_workers, thread_name_prefix, initializer, initargs, **ctxkwargs)
        self._propagate = Options.checked(task_spans, link)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        """Like ``Executor.submit``: ``fn(*args, **kwargs)`` runs with the caller's context."""
        if self._propagate is PLAIN and _switch.hook is None and not INHERITS:
            # bind_snapshot's plain case, without its frame: on a no-op task 100 ns show
            return super().submit(snapshot().run, fn, *args, **kwargs)  # type: ignore[arg-type]
        call, call_args, call_kwargs = bind_snapshot(fn, args, kwargs, self._propagate)
        if INHERITS:  # Python 3.14's flag: see submit_from_empty_context
            return submit_from_empty_context(super().submit, call, *call_args, **call_kwargs)
        return super().submit(call, *call_args, **call_kwargs)


class _StartsInSnapshot(threading.Thread):
    """A thread whose ``run`` runs in a copy of the context of the code calling ``start()``."""

    def start(self) -> None:
        """Start the thread; it runs in a copy of the context of the code calling ``start()``."""
        start_in_snapshot(self, super().start)


def start_in_snapshot(thread: threading.Thread, start: Callable[[], object]) -> None:
    """Call ``start``, ``thread``'s own, so that its ``run`` runs in a snapshot of this context.

    The snapshot goes in an instance ``run``, over the method, for this start only. The
    method is called without OpenTelemetry's threading instrumentor's wrapper, if that is
    on: the snapshot carries its context already.
    """
    if thread.ident is not None:  # started already: let threading raise, touching nothing
        start()
    run = _private.otel_threading_unwrapped(thread.run)
    call, args, kwargs = bind_snapshot(settled, (run,), {})

    def run_in_snapshot() -> None:
        try:
            call(*args, **kwargs)
        finally:
            thread.__dict__.pop("run", None)  # set below: drop the snapshot with it

    thread.__dict__["run"] = run_in_snapshot  # over the method, for this start only
    _private.start_in_empty_context(thread)
    try:
        start()
    except BaseException:
        thread.__dict__.pop("run", None)
        raise


class Thread(_StartsInSnapshot):
    """Like `threading.Thread`, but it runs in a copy of the context that calls ``start()``.

    A subclass may override ``run`` as usual. Changes the thread makes to its context
    never flow back to the starter.
    """


class Timer(_StartsInSnapshot, threading.Timer):
    """Like `threading.Timer`, but it runs in a copy of the context that calls ``start()``."""


def wrap(fn: Callable[P, T]) -> Callable[P, T]:
    """Like ``fn``, but bound to a snapshot of the current context.

    Each call runs in its own fresh copy of that snapshot, so the wrapper may be called
    from several threads at once, and calls never see each other's changes.
    """
    captured = snapshot()

    @functools.wraps(fn)
    def in_snapshot(*args: P.args, **kwargs: P.kwargs) -> T:
        if _switch.hook is not None:
            return captured.copy().run(settled, _switch.around, fn, *args, **kwargs)  # type: ignore[no-any-return]
        return captured.copy().run(settled, fn, *args, **kwargs)

    return in_snapshot
