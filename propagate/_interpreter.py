"""InterpreterPoolExecutor (3.14+): the caller's detached context into subinterpreters."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from . import _private
from ._executor import (
    INHERITS,
    Binding,
    Options,
    bind_detached,
    run_detached,
    run_in_interpreter,
    submit_from_empty_context,
)

P = ParamSpec("P")

T = TypeVar("T")


class InterpreterPoolExecutor(cf.InterpreterPoolExecutor, Binding):  # type: ignore[misc,name-defined,unused-ignore]
    """Like `concurrent.futures.InterpreterPoolExecutor`, but tasks run in the submitter's context.

    Each task runs in a subinterpreter, which shares no objects with this one, so it gets
    what a process gets: the current span's trace identity (spans the task starts are its
    children), the baggage, and the values of ContextVars registered with
    `propagate.register`. Changes made in the task never flow back.

    Tasks are pickled with plain pickle, as the stdlib's pool pickles them: a small task
    of plain data (up to 64 KiB pickled) at ``submit``, so later changes to its
    arguments do not reach it (as with a process pool), and any other when the pool
    sends it. Functions in ``__main__`` go by reference when ``__main__`` is a file, as
    there, and by value under ``python -c`` or in a REPL, where the stdlib's pool cannot
    send them. Unlike the stdlib's pool, lambdas, closures and local functions can be
    sent too (by value, with cloudpickle). What cannot be sent at all fails on the task's
    future, as with the stdlib's pool; a registered ContextVar whose value cannot cross
    fails at ``submit`` with `ContextSerializationError`.

    A subinterpreter imports modules through the path this interpreter started with:
    a directory added to ``sys.path`` at run time is not there, as with the stdlib's pool.

    With ``relay=True`` (the default) and opentelemetry-sdk's tracer provider installed
    here, the spans a subinterpreter records come home to this interpreter's span
    processors, exactly once, before the task's future resolves. ``task_spans`` and
    ``link`` work as for `propagate.ThreadPoolExecutor`. ``relay_logs=True`` brings the
    ``logging`` records a task emits home, as for `propagate.ProcessPoolExecutor`.
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
        relay: bool = True,
        relay_logs: bool = False,
    ) -> None:
        super().__init__(max_workers, thread_name_prefix, initializer, initargs)
        self._propagate = Options.checked(task_spans, link, relay, subinterpreters=True,
                                          relay_logs=relay_logs)

    @classmethod
    def prepare_context(cls, initializer: Callable[..., object] | None,
                        initargs: tuple[Any, ...]) -> Any:
        """The stdlib's, with workers that call each task's `run_detached` directly."""
        direct = _private.direct_interpreter_context(initializer, initargs, run_detached,
                                                     run_in_interpreter)
        return super().prepare_context(initializer, initargs) if direct is None else direct

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        """Like ``Executor.submit``: ``fn(*args, **kwargs)`` runs with the caller's context."""
        call, call_args, _ = bind_detached(fn, args, kwargs, self._propagate)
        if INHERITS:  # Python 3.14's flag: see submit_from_empty_context
            return submit_from_empty_context(super().submit, call, *call_args)
        future: cf.Future[T] = super().submit(call, *call_args)
        return future
