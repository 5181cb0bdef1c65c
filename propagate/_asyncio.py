"""asyncio's ways into executors, carrying the context: to_thread, run_in_executor, install."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from . import _private
from ._executor import (
    INHERITS,
    Binding,
    in_snapshot,
    submit_from_empty_context,
    wrap_executor,
)
from ._thread import ThreadPoolExecutor

P = ParamSpec("P")

T = TypeVar("T")
_installed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ThreadPoolExecutor] = (
    weakref.WeakKeyDictionary())


def _schedule(executor: cf.Executor | None, fn: Callable[..., T], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> asyncio.Future[T]:
    """Hand ``fn`` to ``executor`` through the running loop, bound to the caller's context."""
    loop = asyncio.get_running_loop()
    if executor is None and not isinstance(_private.default_executor(loop), Binding):
        # the stdlib's default executor, a thread pool: bind here, as asyncio.to_thread does
        call = in_snapshot(fn, args, kwargs)
        if INHERITS:  # it may start a worker thread now: see submit_from_empty_context
            return submit_from_empty_context(loop.run_in_executor, None, call)
        return loop.run_in_executor(None, call)
    if executor is not None and not isinstance(executor, Binding):
        executor = wrap_executor(executor)
    # propagate's executor (or the one install() made the default) binds the call itself
    return loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))


async def run_in_executor(executor: cf.Executor | None, fn: Callable[P, T], /,
                          *args: P.args, **kwargs: P.kwargs) -> T:
    """Like ``loop.run_in_executor``, but with keyword arguments, carrying the context.

    ``executor=None`` is the running loop's default executor. A thread pool runs ``fn``
    in a snapshot of the caller's context; a process pool (propagate's or the stdlib's)
    or any other pickling executor gets a detached context, as `wrap_executor` does.
    Changes made in ``fn`` never flow back.
    """
    return await _schedule(executor, fn, args, kwargs)


async def to_thread(fn: Callable[..., T], /, *args: Any, executor: cf.Executor | None = None,
                    **kwargs: Any) -> T:
    """Like `asyncio.to_thread`, but any executor may be given.

    Without ``executor`` it runs in the loop's default executor, in a snapshot of the
    caller's context, exactly as ``asyncio.to_thread`` does; with one it behaves as
    `run_in_executor`.
    """
    return await _schedule(executor, fn, args, kwargs)


def install(loop: asyncio.AbstractEventLoop | None = None) -> ThreadPoolExecutor:
    """Make a `propagate.ThreadPoolExecutor` the loop's default executor; return it.

    Then ``loop.run_in_executor(None, ...)`` and ``loop.getaddrinfo`` carry the caller's
    context. Idempotent. The executor is shut down with the loop, as the stdlib's default
    executor is (``asyncio.run`` calls ``loop.shutdown_default_executor()``); a stdlib
    default executor the loop had already made is shut down without waiting.
    """
    loop = loop or asyncio.get_running_loop()
    current = _private.default_executor(loop) or _installed.get(loop)
    if isinstance(current, ThreadPoolExecutor):
        return current
    executor = ThreadPoolExecutor(thread_name_prefix="asyncio")
    loop.set_default_executor(executor)
    _installed[loop] = executor
    if isinstance(current, cf.Executor):
        current.shutdown(wait=False)
    return executor
