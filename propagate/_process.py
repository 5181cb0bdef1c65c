"""ProcessPoolExecutor: the caller's detached context into worker processes, spans back out."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import sys
from collections.abc import Callable
from multiprocessing.context import BaseContext
from typing import Any, ParamSpec, TypeVar

from ._executor import INHERITS, Binding, Options, bind_detached, submit_from_empty_context

P = ParamSpec("P")

T = TypeVar("T")


class ProcessPoolExecutor(cf.ProcessPoolExecutor, Binding):
    """Like `concurrent.futures.ProcessPoolExecutor`, but tasks run in the submitter's context.

    What crosses: the current span's trace identity (spans the task starts are its
    children), the baggage, and the values of ContextVars registered with
    `propagate.register`. Nothing else does: an unregistered ContextVar keeps the worker's
    own value, and changes made in the worker never flow back.

    Tasks are pickled as the stdlib pickles them, when the pool sends them, with
    multiprocessing's pickler and its reducers (pipes, sockets, shared memory, the ones
    you register): the pool holds no copy of a pending task, an argument changed after
    ``submit`` arrives changed, and what cannot be pickled fails on the task's future with
    the pickler's own exception. What that pickler cannot send at all (lambdas, closures,
    local functions, tracers) goes by cloudpickle instead. Only a registered ContextVar
    whose value cannot cross fails at ``submit``, with `ContextSerializationError`.

    With ``relay=True`` (the default) and opentelemetry-sdk's tracer provider installed
    here, the spans a worker records come home to this process's span processors,
    exactly once, before the task's future resolves; workers need no configuration and
    export nothing themselves. ``task_spans`` and ``link`` work as for
    `propagate.ThreadPoolExecutor`, with ``process.pid`` added.

    With ``relay_logs=True`` (needs opentelemetry-sdk), the ``logging`` records a task
    emits in a worker are handled here instead, by this process's loggers, once each,
    in order, before the task's future resolves, and with the worker's span context of
    the moment they were logged current: handlers and filters see the worker's trace
    and span ids. This process's logger levels decide which records come home; the
    worker's handlers see none of them. See the processes guide.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: BaseContext | None = None,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
        task_spans: bool = False,
        link: bool = False,
        relay: bool = True,
        relay_logs: bool = False,
    ) -> None:
        if max_tasks_per_child is None:
            super().__init__(max_workers, mp_context, initializer, initargs)
        elif sys.version_info < (3, 11):
            raise TypeError("max_tasks_per_child needs Python 3.11 or newer")
        else:
            super().__init__(max_workers, mp_context, initializer, initargs,
                             max_tasks_per_child=max_tasks_per_child)
        self._propagate = Options.checked(task_spans, link, relay, relay_logs=relay_logs)
        if mp_context is None:  # the stdlib's choice, made in its __init__ just now
            mp_context = multiprocessing.get_context(
                None if max_tasks_per_child is None else "spawn")
        # What submit() starts that would keep the submitter's context: a worker forked
        # there, and (under thread_inherit_context) the pool's manager thread.
        self._starts_heirs = INHERITS or mp_context.get_start_method() == "fork"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        """Like ``Executor.submit``: ``fn(*args, **kwargs)`` runs with the caller's context."""
        call, call_args, _ = bind_detached(fn, args, kwargs, self._propagate)
        if self._starts_heirs:
            return submit_from_empty_context(super().submit, call, *call_args)
        return super().submit(call, *call_args)
