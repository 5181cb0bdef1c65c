"""The one submit path: how every executor captures the caller's context and runs in it.

Two ways to carry a context, chosen by where the task runs:

* in this process (threads): a snapshot, ``contextvars.copy_context()``, and
  ``snapshot.run(fn)`` in the worker. It carries every ContextVar, OpenTelemetry's
  current context among them, so this path needs no OpenTelemetry code at all;
* in another process: a `DetachedContext`, sent with the task (`_wire`), attached in
  the worker around the call, and detached on the same thread after it.

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
from collections.abc import Callable
from typing import Any, NamedTuple, ParamSpec, TypeVar

from . import _context, _otel, _private, _span, _switch, _wire

P = ParamSpec("P")

T = TypeVar("T")
R = TypeVar("R")
# Python 3.14's flag (the free-threaded default): a new thread starts in a copy of the
# context of the code that starts it, and a pool starts its workers inside submit().
INHERITS = bool(getattr(sys.flags, "thread_inherit_context", False))


class Options(NamedTuple):
    """What an executor adds to each task beyond the context."""

    task_spans: bool = False
    link: bool = False
    relay: bool = True
    main_by_value: bool = False  # the workers' __main__ is not ours (Dask, loky): cloudpickle it
    subinterpreters: bool = False  # they find __main__ only if it is a file (see _wire.Lazy)
    relay_logs: bool = False  # the workers' log records come home (_logs)

    @classmethod
    def checked(cls, task_spans: bool = False, link: bool = False, relay: bool = True,
                main_by_value: bool = False, subinterpreters: bool = False,
                relay_logs: bool = False) -> Options:
        """The options a constructor was given, checked there: bools only; link needs a span;
        relay_logs needs opentelemetry-sdk, whose relay carries the records."""
        for name, value in (("task_spans", task_spans), ("link", link), ("relay", relay),
                            ("relay_logs", relay_logs)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, not {value!r}")
        if relay_logs and not _relay_module():
            raise ImportError("relay_logs=True needs opentelemetry-sdk, which carries the "
                              "records home: pip install 'propagate[sdk]'")
        options = cls(task_spans or link, link, relay, main_by_value, subinterpreters,
                      relay_logs)
        return PLAIN if options == PLAIN else options

    def asked(self) -> tuple[bool, ...]:
        """What the user chose (the rest follows from the executor)."""
        return (self.task_spans, self.link, self.relay, self.relay_logs)


PLAIN = Options()


Call = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]  # what to hand to submit()


class Binding:
    """An executor that binds each task to the submitter's context itself (ours, all).

    Handing it a task already bound would take a second snapshot: `wrap_executor` and the
    asyncio helpers pass such an executor the bare call.
    """

    _propagate: Options


def snapshot() -> contextvars.Context:
    """The one capture for threads: heal this thread's scopes, then copy its context."""
    if _span.orphans:
        _span.heal()
    if _switch.hook is not None:
        _switch.point("capture")
    return contextvars.copy_context()


def bind_snapshot(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  options: Options = PLAIN) -> Call:
    """``fn(*args, **kwargs)`` bound to a snapshot of the current context, as a submit call."""
    run = snapshot().run
    if options is PLAIN and _switch.hook is None:  # the hot path: nothing but the snapshot
        return run, (fn, *args), kwargs
    name = _wire.describe(fn) if options.task_spans else None
    if _switch.hook is not None:
        fn, args = _switch.around, (fn, *args)
    if name is None:
        return run, (fn, *args), kwargs
    return run, (_run_task, (name, time.time_ns(), options.link), fn, args, kwargs), {}


def settled(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run a call in its own Context, which ends with it: so do scopes left open in it.

    For what runs outside a pool (``Thread``, ``wrap``, a worker process's task): in a
    pool the task's future says when it ends (`_span.life`), at no cost per task.
    """
    if _span.life.get() is not None:  # the submitter's: this task's scopes get their own
        _span.life.set(None)
    try:
        return fn(*args, **kwargs)
    finally:
        ended = _span.life.get()  # set only if a scope was entered: then it ends here
        if ended is not None:
            _span.end_of_context(ended)


_NO_KWARGS: dict[str, Any] = {}  # held by every task called without: never changed
# A task's own fields: its span's name (None: no span), when it was submitted, whether
# the span links instead of parenting, whether the stdlib's pool sends the result (with
# multiprocessing's pickler, so the worker checks a result carrying spans can be sent
# before it goes), and, with relay_logs, (origin, the submitter's logger levels).
Task = tuple[str | None, int, bool, bool, Any]
_NO_SPAN_SENT_BY_STDLIB: Task = (None, 0, False, True, None)  # no task span, no logs
_NO_SPAN_SENT_BY_OTHERS: Task = (None, 0, False, False, None)


def bind_detached(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  options: Options = PLAIN) -> Call:
    """``fn(*args, **kwargs)`` with a detached context, as a submit call.

    For the stdlib's process and interpreter pools (``main_by_value`` false) the call is
    handed over as it is, to be pickled when the pool sends it (`_wire.Lazy`); for any
    other executor it is pickled here, and what cannot cross raises
    `TaskSerializationError` right away. A registered ContextVar whose value cannot cross
    raises `ContextSerializationError` here in both cases.
    """
    identity, baggage, values = _context.capture_fields()
    task: Task
    logs = _logs_home() if options.relay_logs else None
    if options.task_spans:
        task = (_wire.describe(fn), time.time_ns(), options.link, not options.main_by_value,
                logs)
    elif logs is not None:
        task = _logs_task(not options.main_by_value, logs)
    else:  # one tuple for every such task: each pending task holds its envelope
        task = _NO_SPAN_SENT_BY_OTHERS if options.main_by_value else _NO_SPAN_SENT_BY_STDLIB
    origin = _relay_origin() if options.relay else None
    envelope = _wire.envelope(fn, args, kwargs or _NO_KWARGS, task,
                              _wire.context(identity, baggage, values, origin))
    if options.main_by_value:
        return run_detached, (_wire.dumps(envelope, values),), {}
    if values:
        _wire.check_values(values)
    main = not options.subinterpreters or _wire.main_is_a_file()
    if _wire.plainly_sendable(envelope, main):  # the pool's pickler surely sends it as it is
        # Spread as the call's arguments: the pool's pending task holds one tuple, as the
        # stdlib's does (an extra object per pending task is an extra for the collector).
        if not options.subinterpreters:
            return run_detached, envelope, {}
        sealed = _wire.sealed(envelope)  # a small blob: what a subinterpreter takes cheapest
        if sealed is not None:
            return run_detached, sealed, {}
    return run_detached, (_wire.Lazy(envelope, main),), {}


def in_snapshot(fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any],
                options: Options = PLAIN) -> Callable[[], T]:
    """``fn(*args, **kwargs)`` bound to a snapshot of the current context."""
    call, call_args, call_kwargs = bind_snapshot(fn, args, kwargs, options)
    return functools.partial(call, *call_args, **call_kwargs)


def submit_from_empty_context(submit: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Call an executor's ``submit`` from an empty Context, for a task already bound.

    Pools start workers inside ``submit``: a forked process, or a thread under Python
    3.14's ``thread_inherit_context``, would keep the caller's whole context for life.
    """
    return contextvars.Context().run(submit, *args, **kwargs)


_relay: Any = None  # propagate._relay, imported on first use: it needs opentelemetry-sdk


def _relay_module() -> Any:
    """propagate._relay, or False where opentelemetry-sdk is missing (a bare Dask worker)."""
    global _relay
    if _relay is None:
        try:
            from . import _relay as module
        except ImportError:  # telemetry trouble never fails the task: run without the relay
            _relay = False
        else:
            _relay = module
    return _relay


def _relay_origin() -> tuple[int, str] | None:
    if "opentelemetry.sdk.trace" not in sys.modules:  # no SDK, so no provider to relay to
        return None
    relay = _relay_module()
    return relay.origin() if relay else None


def _logs_home() -> tuple[tuple[int, str], Any]:
    """A relay_logs task's field: where its records go, and the levels that choose them.

    The same tuple while neither changes (tasks of one pool share it, as they share
    the no-span task tuples).
    """
    global _logs_field
    origin, levels = _relay_module().here(), _logs_module().levels()
    field = _logs_field
    if field[0] is not origin or field[1] is not levels:
        field = _logs_field = (origin, levels)
    return field


_logs_field: tuple[Any, Any] = (None, None)
_logs: Any = None  # propagate._logs, imported on first use: only relay_logs needs it


def _logs_module() -> Any:
    global _logs
    if _logs is None:
        from . import _logs as module

        _logs = module
    return _logs


def _logs_task(checked: bool, logs: tuple[Any, Any]) -> Task:
    """The task fields of a relay_logs task without a span: one tuple per ``logs`` field."""
    task = _logs_tasks.get(checked)
    if task is None or task[4] is not logs:
        task = _logs_tasks[checked] = (None, 0, False, checked, logs)
    return task


_logs_tasks: dict[bool, Task] = {}


def run_detached(*sent: Any) -> Any:
    """Run a task made by `bind_detached`, in the worker, in a copy of the worker's context.

    Takes the envelope spread as its arguments, or as one (a `_wire.Lazy` arrives so).
    """
    fn, args, kwargs, task, context = _wire.opened(sent[0] if len(sent) == 1 else sent)
    chunk = _private.map_chunk(fn)
    if chunk is not None:  # ProcessPoolExecutor.map(chunksize=n): each item in its own copy
        fn = _private.rechunk(chunk[0], _isolated)
    if _switch.hook is not None:
        fn, args = _switch.around, (fn, *args)
    made = _context.task_context(context)  # the detached context current in it already
    if made is not None:
        ctx, origin = made
        return ctx.run(_run_attached, fn, args, kwargs, task, origin, None)
    identity, baggage, values, origin = _wire.context_fields(context)
    return contextvars.copy_context().run(
        _run_attached, fn, args, kwargs, task, origin, (identity, baggage, values))


def run_in_interpreter(results: Any, *sent: Any) -> Any:
    """`run_detached`, in an InterpreterPoolExecutor's subinterpreter, called directly.

    Through the stdlib's ``do_call``, so an exception goes to ``results`` as the stdlib's
    pool sends it (see `_private.direct_interpreter_context`).
    """
    do_call = _private.interpreter_do_call()
    assert do_call is not None  # the pool checked, in this same Python
    return do_call(results, run_detached, sent, _NO_KWARGS)


def _isolated(fn: Callable[..., T], *args: Any) -> T:
    return contextvars.copy_context().run(fn, *args)


def _run_attached(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                  task: tuple[Any, ...], origin: tuple[int, str] | None,
                  detached: tuple[Any, ...] | None) -> Any:
    """Run the task in the current Context: with ``detached`` entered around it, if given
    (else the Context was made with it current, by `_context.task_context`)."""
    relay: Any = None
    batch = logs = None  # each None where the task was sent from, or is not relayed
    home, logs_field = origin, task[4]  # where spans and records go: the same process
    if origin is not None or logs_field is not None:
        relay = _relay_module()
        if relay:
            batch = relay.open_batch(origin) if origin is not None else None
            if logs_field is not None:
                home, levels = logs_field
                logs = _capture_logs(relay, home, levels)
    state = None if detached is None else _context.enter(*detached)
    unsendable = None
    try:
        if task[0] is None:  # no task span
            result = settled(fn, *args, **kwargs)
        else:
            result = settled(_run_task, task, fn, args, kwargs)
    except BaseException as exc:
        if batch is None and logs is None:
            raise
        unsendable = _carry_home(relay, home, _closed(batch), exc, task[3], raised=True,
                                 logs=_closed(logs))
        if unsendable is None:
            raise
    finally:
        if state is not None:
            _context.leave(state)
    if unsendable is not None:  # raised here, outside the handler: it has no __context__
        raise unsendable
    if batch is None and logs is None:
        return result
    spans, records = _closed(batch), _closed(logs)
    if not spans and not records:
        return result
    unsendable = _carry_home(relay, home, spans, result, task[3], logs=records)
    if unsendable is not None:
        raise unsendable
    return relay.reply(home, spans, result, records)


def _capture_logs(relay: Any, origin: tuple[int, str], levels: Any) -> Any:
    """The task's log capture (`_logs.Capture`); None where it was sent from."""
    if origin == relay.here():  # this process: its own handlers take the records
        return None
    return _logs_module().capture(levels)


def _closed(collected: Any) -> list[Any]:
    """What a span batch or a log capture collected, now closed; [] for None."""
    return [] if collected is None else collected.close()


def _carry_home(relay: Any, origin: tuple[int, str] | None, spans: list[Any], outcome: object,
                checked: bool, raised: bool = False,
                logs: list[bytes] | None = None) -> BaseException | None:
    """Ready ``spans`` (and log records) to ride home on ``outcome``, the task's result or
    its exception.

    Where the stdlib's pool will pickle the outcome (``checked``), check first that it
    can. If not, returns the pickler's own exception, carrying the spans, to be raised in
    its place: the stdlib sends that exception home when an outcome cannot be pickled.
    It is freed of the outcome (``__context__``), which could not be pickled either.
    """
    error = _wire.sendable(outcome) if checked and (spans or logs) else None
    if error is not None:
        error.__context__ = error.__cause__ = None
        relay.stash(error, origin, spans, logs)
        return error
    if raised:  # the spans ride on it (else on the result's Reply)
        relay.stash(outcome, origin, spans, logs)
    return None


def _run_task(task: tuple[Any, ...], fn: Callable[..., T], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> T:
    """``fn(*args, **kwargs)`` in a span of its own, which ``task`` names."""
    span_name, submitted_ns, link = task[:3]
    attributes = {
        "thread.id": threading.get_native_id(),
        "thread.name": threading.current_thread().name,
        "process.pid": os.getpid(),
        "propagate.queue_seconds": max(0, time.time_ns() - submitted_ns) / 1e9,
    }
    with _otel.task_span(span_name, link, attributes):
        return fn(*args, **kwargs)


class WrappedExecutor(cf.Executor, Binding):
    """Any `concurrent.futures.Executor`, made to carry the caller's context.

    Thread pools get snapshots; every other executor is taken to run tasks elsewhere
    (loky, Dask's ``client.get_executor()``, ``multiprocessing``-based pools) and gets
    the task pickled with a detached context.
    """

    def __init__(self, executor: cf.Executor, options: Options) -> None:
        self.executor = executor
        self._propagate = options
        threads = in_process_threads(executor)
        self._bind = bind_snapshot if threads else bind_detached
        self._starts_workers = is_process_pool(executor) or (
            INHERITS and isinstance(executor, cf.ThreadPoolExecutor))

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        call, call_args, call_kwargs = self._bind(fn, args, kwargs, self._propagate)
        if self._starts_workers:
            return submit_from_empty_context(self.executor.submit, call, *call_args, **call_kwargs)
        return self.executor.submit(call, *call_args, **call_kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self.executor.shutdown(wait=wait, cancel_futures=True)
        else:  # not every Executor takes cancel_futures (Dask's does not)
            self.executor.shutdown(wait=wait)

    def __repr__(self) -> str:
        return f"<propagate.wrap_executor({self.executor!r})>"


def in_process_threads(executor: cf.Executor) -> bool:
    """Whether ``executor`` runs tasks on threads of this interpreter, so a snapshot can cross.

    3.14's ``InterpreterPoolExecutor`` is a ``ThreadPoolExecutor`` whose threads run each
    task in a subinterpreter: the task is pickled there, so it needs a detached context.
    """
    return (isinstance(executor, cf.ThreadPoolExecutor)
            and not is_interpreter_pool(executor))


def is_process_pool(executor: object) -> bool:
    """Whether ``executor`` is a ``concurrent.futures.ProcessPoolExecutor``."""
    return _is_a(executor, "concurrent.futures.process", "ProcessPoolExecutor")


def is_interpreter_pool(executor: object) -> bool:
    """Whether ``executor`` is a ``concurrent.futures.InterpreterPoolExecutor`` (3.14+)."""
    return _is_a(executor, "concurrent.futures.interpreter", "InterpreterPoolExecutor")


def _is_a(executor: object, module: str, name: str) -> bool:
    """Asked of the module only if it was imported: if not, nothing can be an instance (and
    ``concurrent.futures.ProcessPoolExecutor`` would import multiprocessing to say so)."""
    kind = getattr(sys.modules.get(module), name, None)
    return kind is not None and isinstance(executor, kind)


def wrap_executor(executor: cf.Executor, *, task_spans: bool = False, link: bool = False,
                  relay: bool = True, relay_logs: bool = False) -> cf.Executor:
    """Like the given executor, but every task runs in the submitter's context.

    A thread pool runs each task in a snapshot of the submitter's context (every
    ContextVar crosses). Any other executor is assumed to pickle its work: tasks carry a
    `DetachedContext` (trace identity, baggage, registered ContextVars), and spans
    recorded by the worker come home through the relay. Changes made in a task never
    flow back to the submitter. ``relay=False`` leaves the workers' own tracing alone.
    ``relay_logs=True`` brings the log records tasks emit in the workers home, as for
    `propagate.ProcessPoolExecutor`; a thread pool's records are handled here anyway.

    An ``InterpreterPoolExecutor`` (3.14+) runs each task in a subinterpreter: it gets
    a detached context, as processes do, and its spans come home through the relay.

    The stdlib's process and interpreter pools pickle each task when they send it, as
    without propagate. For any other executor, whose workers do not import the
    submitter's ``__main__``, the task is pickled at ``submit``, with functions defined in
    ``__main__`` by value.

    An executor of propagate's own (a pool, or one wrapped already) binds its tasks
    itself and is returned as it is, so nothing is bound twice; asking it for other
    ``task_spans``, ``link`` or ``relay`` than it has raises `ValueError`.
    """
    if not isinstance(executor, cf.Executor):
        raise TypeError(f"wrap_executor() takes a concurrent.futures.Executor, not {executor!r}")
    interpreters = is_interpreter_pool(executor)
    stdlib_pickles = interpreters or is_process_pool(executor)
    options = Options.checked(task_spans, link, relay, main_by_value=not stdlib_pickles,
                              subinterpreters=interpreters, relay_logs=relay_logs)
    if isinstance(executor, Binding):  # binds already: wrapping again would bind twice
        return _already_binding(executor, options)
    return WrappedExecutor(executor, options)


def _already_binding(executor: Binding, options: Options) -> cf.Executor:
    asked = options.asked()
    if asked != PLAIN.asked() and asked != executor._propagate.asked():
        raise ValueError(
            f"{executor!r} already carries the context with its own task_spans, link, "
            "relay and relay_logs; set them where it is made instead of in wrap_executor()")
    assert isinstance(executor, cf.Executor)
    return executor
