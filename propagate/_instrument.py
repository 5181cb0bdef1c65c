"""instrument(): the stdlib's own pools and threads carry the context, process-wide.

Patches ``ThreadPoolExecutor.submit``, ``ProcessPoolExecutor.submit`` and
``Thread.start`` of ``concurrent.futures`` and ``threading`` (so every subclass that does not
override them, the asyncio loop's default executor, and 3.14's
``InterpreterPoolExecutor``), each to bind its task as propagate's own classes do, then
call the method that was there. What binds itself already passes through: propagate's
classes, a call bound to a Context (``asyncio.to_thread``, propagate's helpers), a
detached task. OpenTelemetry's threading instrumentor, on in either order, is stepped
over (`_private.otel_threading_unwrapped`): the snapshot carries its context already.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import functools
import sys
import threading
from collections.abc import Callable
from types import FunctionType
from typing import Any, TypeVar

from . import _private, _switch
from ._executor import (
    Binding,
    Options,
    bind_detached,
    bind_snapshot,
    is_interpreter_pool,
    run_detached,
    snapshot,
    submit_from_empty_context,
)
from ._thread import _StartsInSnapshot, start_in_snapshot

T = TypeVar("T")

_PROCESSES = Options.checked()  # as propagate.ProcessPoolExecutor's defaults: the relay on
_INTERPRETERS = Options.checked(subinterpreters=True)
_SUBINTERPRETERS = sys.version_info >= (3, 14)
_OTEL_THREADING = "opentelemetry.instrumentation.threading"

_lock = threading.Lock()
# (class, name, ours, what its __dict__ held before): empty while uninstrumented
_patched: list[tuple[type, str, object, object]] = []
_otel_was_on = False  # whether OpenTelemetry's threading instrumentor was, at instrument()


def instrument() -> None:
    """Make the stdlib's pools and threads carry the caller's context, for the whole process.

    Until `uninstrument`, in every thread:

    * ``concurrent.futures.ThreadPoolExecutor.submit`` (every subclass that does not
      override it, and so the asyncio loop's default executor: ``loop.run_in_executor(None,
      ...)`` and ``loop.getaddrinfo``) runs each task in a snapshot of the submitter's
      context, as `propagate.ThreadPoolExecutor` does;
    * ``threading.Thread.start`` (subclasses that override ``run`` included, and
      ``threading.Timer``) runs the thread in a snapshot of the context of the code that
      calls ``start()``, as `propagate.Thread` does;
    * ``concurrent.futures.ProcessPoolExecutor.submit``, and on Python 3.14+
      ``InterpreterPoolExecutor``'s, send each task with the submitter's detached context,
      and the spans it records come home through the relay, as with
      `propagate.ProcessPoolExecutor` (``relay=True``, no task spans).

    Changes made in a task never flow back. Nothing is bound twice: propagate's own classes,
    calls already bound to a context (``asyncio.to_thread``, `propagate.to_thread`,
    `wrap_executor`'s) and OpenTelemetry's threading instrumentor, if it is on too, in
    either order, are recognised. Pools start their workers from an empty context, so a
    worker keeps nothing of the submitter that started it.

    Idempotent and thread-safe. Imports ``concurrent.futures.process`` (multiprocessing).
    The ``opentelemetry_instrumentor`` entry point ``propagate`` calls it under
    ``opentelemetry-instrument``.
    """
    with _lock:
        if _patched:
            return
        from concurrent.futures import process

        patches: list[tuple[type, str, Callable[[Any], Any]]] = [
            (cf.ThreadPoolExecutor, "submit", _thread_submit),
            (process.ProcessPoolExecutor, "submit", _process_submit),
            (threading.Thread, "start", _thread_start),
        ]
        if "start" in vars(threading.Timer):  # OpenTelemetry's instrumentor puts one there
            patches.append((threading.Timer, "start", _thread_start))
        for cls, name, patch in patches:
            held = vars(cls)[name]
            method = _private.otel_threading_unwrapped(held)  # stepped over: see the module
            ours = functools.update_wrapper(patch(_callable_on(method)), method)
            setattr(cls, name, ours)
            _patched.append((cls, name, ours, held))
        global _otel_was_on
        _otel_was_on = _otel_threading_on()


def uninstrument() -> None:
    """Undo `instrument`: the stdlib's classes get back exactly the attributes they had.

    Does nothing if propagate is not instrumented. Threads and tasks already started keep
    their snapshots. An instrumentation that wrapped propagate's methods meanwhile
    (OpenTelemetry's threading instrumentor) keeps its wrappers, around what propagate
    found, so it can still uninstrument itself.
    """
    with _lock:
        replaced = {id(ours): held for _, _, ours, held in _patched}
        # OpenTelemetry's instrumentor, uninstrumented meanwhile, found none of its wrappers
        # to remove (ours were over them): they are not put back
        dropped = _otel_was_on and not _otel_threading_on()
        for cls, name, ours, held in reversed(_patched):
            if vars(cls).get(name) is ours:
                setattr(cls, name, _private.otel_threading_unwrapped(held) if dropped else held)
        # A wrapper put over ours (OpenTelemetry's, also on Timer.start, which it wraps
        # from Thread.start's) now wraps what ours replaced
        for cls, name, _, _ in _patched:
            _private.splice_out(vars(cls).get(name), replaced)
        _private.splice_out(vars(threading.Timer).get("start"), replaced)
        _patched.clear()


def _otel_threading_on() -> bool:
    """Whether OpenTelemetry's threading instrumentor is on (its public property)."""
    module = sys.modules.get(_OTEL_THREADING)
    return module is not None and bool(
        module.ThreadingInstrumentor().is_instrumented_by_opentelemetry)


def _callable_on(method: Any) -> Callable[..., Any]:
    """``method`` as a plain function of the instance: a function as it is, a wrapper (a
    descriptor that binds otherwise) bound to the instance at each call."""
    if type(method) is FunctionType:
        return method

    def bound(self: object, *args: Any, **kwargs: Any) -> Any:
        return method.__get__(self, type(self))(*args, **kwargs)

    return bound


def _bound(fn: object) -> bool:
    """Whether ``fn`` is bound to a context already: a Context's ``run`` (or a partial of one,
    as ``asyncio.to_thread`` and propagate's helpers hand over), or a detached task."""
    if type(fn) is FunctionType:
        return fn is run_detached
    if isinstance(fn, functools.partial):
        fn = fn.func
    return fn is run_detached or isinstance(getattr(fn, "__self__", None), contextvars.Context)


def _thread_submit(submit: Callable[..., cf.Future[T]]) -> Callable[..., cf.Future[T]]:
    def patched(self: cf.ThreadPoolExecutor, fn: Callable[..., T], /, *args: Any,
                **kwargs: Any) -> cf.Future[T]:
        # Always from an empty Context: submit may start a worker, with Thread.start patched
        if type(fn) is FunctionType and fn.__module__ == _OTEL_THREADING:
            fn = _private.otel_threading_unwrapped(fn)  # its closure, made by its wrapper
        if isinstance(self, Binding) or _bound(fn):
            return submit_from_empty_context(submit, self, fn, *args, **kwargs)
        if _SUBINTERPRETERS and is_interpreter_pool(self):
            call, call_args, _ = bind_detached(fn, args, kwargs, _INTERPRETERS)
            return submit_from_empty_context(submit, self, call, *call_args)
        if _switch.hook is None:  # bind_snapshot's plain case, without its frame
            return submit_from_empty_context(submit, self, snapshot().run, fn, *args, **kwargs)
        call, call_args, call_kwargs = bind_snapshot(fn, args, kwargs)
        return submit_from_empty_context(submit, self, call, *call_args, **call_kwargs)

    return patched


def _process_submit(submit: Callable[..., cf.Future[T]]) -> Callable[..., cf.Future[T]]:
    def patched(self: cf.Executor, fn: Callable[..., T], /, *args: Any,
                **kwargs: Any) -> cf.Future[T]:
        # From an empty Context: a worker forked here would keep the submitter's for life
        if isinstance(self, Binding) or fn is run_detached:
            return submit_from_empty_context(submit, self, fn, *args, **kwargs)
        call, call_args, _ = bind_detached(fn, args, kwargs, _PROCESSES)
        return submit_from_empty_context(submit, self, call, *call_args)

    return patched


def _thread_start(start: Callable[[threading.Thread], None]) -> Callable[[threading.Thread], None]:
    def patched(self: threading.Thread) -> None:
        # propagate.Thread and Timer bind themselves; a 3.14 thread given context= keeps it
        if isinstance(self, _StartsInSnapshot) or _private.thread_context(self) is not None:
            return start(self)
        start_in_snapshot(self, functools.partial(start, self))
        return None

    return patched
