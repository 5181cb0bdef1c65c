"""The one submit path: how every executor captures the caller's context and runs in it.

Two ways to carry a context, chosen by where the task runs:

* in this process (threads): a snapshot, ``contextvars.copy_context()``, and
  ``snapshot.run(fn)`` in the worker. It carries every ContextVar, OpenTelemetry's
  current context among them, so this path needs no OpenTelemetry code at all;
* in another process: a `DetachedContext`, pickled with the task at submit, attached
  in the worker around the call, and detached on the same thread after it.

Thread pools, process pools, `wrap_executor` and the asyncio helpers all bind their
tasks here, so there is one way to capture and one way to run.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import functools
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, TypeVar

from . import _context, _otel, _switch, _wire
from ._span import heal

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    P = ParamSpec("P")

T = TypeVar("T")


class Options(NamedTuple):
    """What an executor adds to each task beyond the context."""

    task_spans: bool = False
    link: bool = False
    relay: bool = True


class _Task(NamedTuple):
    """What travels with a detached task besides the function and its arguments."""

    span_name: Optional[str]  # None: no task span
    submitted_ns: int
    link: bool
    origin: Optional[tuple[int, str]]  # the submitting process, when spans should come home


def in_snapshot(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
                options: Options = Options()) -> Callable[[], T]:
    """``fn(*args, **kwargs)`` bound to a snapshot of the current context."""
    heal()
    snapshot = contextvars.copy_context()
    name = _wire.describe(fn) if options.task_spans else None
    if _switch.hook is not None:
        _switch.point("capture")
        fn, args = _switch.around, (fn, *args)
    if name is None:
        return functools.partial(snapshot.run, fn, *args, **kwargs)
    task = _Task(name, time.time_ns(), options.link, None)
    return functools.partial(snapshot.run, _run_task, task, fn, args, kwargs)


def detached(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
             options: Options = Options()) -> Callable[[], T]:
    """``fn(*args, **kwargs)`` pickled with a detached context: a callable to send anywhere.

    Raises `ContextSerializationError` or `TaskSerializationError` right here, in the
    caller, when something cannot cross.
    """
    heal()
    ctx = _context.capture()
    _switch.point("capture")
    name = _wire.describe(fn) if options.task_spans else None
    task = _Task(name, time.time_ns(), options.link, _relay_origin() if options.relay else None)
    blob = _wire.dumps(fn, (fn, args, kwargs, ctx, task), ctx)
    return functools.partial(run_detached, blob)


def _relay_origin() -> Optional[tuple[int, str]]:
    if "opentelemetry.sdk.trace" not in sys.modules:  # no SDK, so no provider to relay to
        return None
    from . import _relay

    return _relay.here() if _relay.enabled() else None


def _is_here(origin: tuple[int, str]) -> bool:
    if origin[0] != os.getpid():
        return False
    from . import _relay

    return origin == _relay.here()


def run_detached(blob: bytes) -> Any:
    """Run a task made by `detached`, in the worker: a fresh copy of the worker's context."""
    fn, args, kwargs, ctx, task = _wire.loads(blob)
    if _switch.hook is not None:
        fn, args = _switch.around, (fn, *args)
    return contextvars.copy_context().run(_run_attached, fn, args, kwargs, ctx, task)


def _run_attached(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  ctx: _context.DetachedContext, task: _Task) -> Any:
    origin = task.origin
    if origin is None or _is_here(origin):  # same process: its spans are already home
        with ctx.attach():
            return _run_task(task, fn, args, kwargs)
    from . import _relay

    _relay.install()
    batch = _relay.Batch()
    try:
        with ctx.attach():
            result = _run_task(task, fn, args, kwargs)
    except BaseException as exc:
        _relay.stash(exc, origin, batch.close())
        raise
    return _relay.Reply(origin, batch.close(), result)


def _run_task(task: _Task, fn: Callable[..., T], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> T:
    if task.span_name is None:
        return fn(*args, **kwargs)
    thread = threading.current_thread()
    attributes = {
        "thread.id": threading.get_native_id(),
        "thread.name": thread.name,
        "process.pid": os.getpid(),
        "propagate.queue_seconds": max(0, time.time_ns() - task.submitted_ns) / 1e9,
    }
    with _otel.task_span(task.span_name, task.link, attributes):
        return fn(*args, **kwargs)


class WrappedExecutor(cf.Executor):
    """Any `concurrent.futures.Executor`, made to carry the caller's context.

    Thread pools get snapshots; every other executor is taken to run tasks elsewhere
    (loky, Dask's ``client.get_executor()``, ``multiprocessing``-based pools) and gets
    the task pickled with a detached context.
    """

    def __init__(self, executor: cf.Executor, options: Options) -> None:
        self.executor = executor
        self._options = options
        self._bind = in_snapshot if isinstance(executor, cf.ThreadPoolExecutor) else detached

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        return self.executor.submit(self._bind(fn, args, kwargs, self._options))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __repr__(self) -> str:
        return f"<propagate.wrap_executor({self.executor!r})>"


def wrap_executor(executor: cf.Executor, *, task_spans: bool = False,
                  link: bool = False) -> cf.Executor:
    """Like the given executor, but every task runs in the submitter's context.

    A thread pool runs each task in a snapshot of the submitter's context (every
    ContextVar crosses). Any other executor is assumed to pickle its work: tasks carry a
    `DetachedContext` (trace identity, baggage, registered ContextVars), and spans
    recorded by the worker come home through the relay. Changes made in a task never
    flow back to the submitter.
    """
    if not isinstance(executor, cf.Executor):
        raise TypeError(f"wrap_executor() takes a concurrent.futures.Executor, not {executor!r}")
    return WrappedExecutor(executor, Options(task_spans, link))
