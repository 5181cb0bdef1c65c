"""asyncio's ways into executors, carrying the context: to_thread, run_in_executor, install."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import functools
import sys
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from . import _private
from ._executor import (
    INHERITS,
    Binding,
    in_snapshot,
    submit_from_empty_context,
    wrap_executor,
)
from ._thread import ThreadPoolExecutor

if sys.version_info >= (3, 11):
    from typing import TypeVarTuple, Unpack
else:
    from typing_extensions import TypeVarTuple, Unpack

P = ParamSpec("P")
Ts = TypeVarTuple("Ts")

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


# Two signatures, since PEP 612 allows no keyword-only parameter (``executor``) beside
# ``P.kwargs``: positional arguments with or without an executor, or keyword arguments
# without one. Both check ``fn``'s arguments; keywords *and* an executor together are
# refused by a type checker, though they work: run_in_executor checks that form.
@overload
async def to_thread(fn: Callable[[Unpack[Ts]], T], /, *args: Unpack[Ts],
                    executor: cf.Executor | None = None) -> T: ...
@overload
async def to_thread(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T: ...


async def to_thread(  # type: ignore[misc]  # mypy cannot match Unpack[Ts] to *args: Any
        fn: Callable[..., T], /, *args: Any, executor: cf.Executor | None = None,
        **kwargs: Any) -> T:
    """Like `asyncio.to_thread`, but any executor may be given.

    Without ``executor`` it runs in the loop's default executor, in a snapshot of the
    caller's context, exactly as ``asyncio.to_thread`` does; with one it behaves as
    `run_in_executor`. A type checker checks ``fn``'s arguments, as for
    ``asyncio.to_thread``; it refuses keyword arguments for ``fn`` together with
    ``executor`` (PEP 612 has no way to type both): for that form, write
    ``run_in_executor(executor, fn, *args, **kwargs)``, which it checks.
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
