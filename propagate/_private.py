"""Every private internal of the stdlib and opentelemetry-sdk that propagate touches.

Each is reached through one function here and nowhere else, and each is guarded: when a
release moves it, the function falls back to doing less and warns once, naming what
moved and what is lost. It never fails a task, and nothing here runs at import.
``docs/design.md`` lists them with the versions they are tested on.
"""

from __future__ import annotations

import functools
import sys
import threading
import warnings
from collections.abc import Callable
from contextvars import Context
from types import CodeType, FrameType
from typing import Any

_warned: set[str] = set()
_warned_lock = threading.Lock()


def moved(what: str, lost: str) -> None:
    """Warn once per process that ``what`` is not where propagate expects it."""
    with _warned_lock:
        if what in _warned:
            return
        _warned.add(what)
    version = ".".join(map(str, sys.version_info[:3]))
    warnings.warn(f"propagate: {what} is missing or not as propagate expects it (Python "
                  f"{version}); {lost}", RuntimeWarning, stacklevel=3)


# -- concurrent.futures ---------------------------------------------------------------------


@functools.cache
def _process_chunk() -> Callable[..., Any] | None:
    from concurrent.futures import process

    return getattr(process, "_process_chunk", None)


def map_chunk(fn: object) -> tuple[Any, ...] | None:
    """``(fn, chunk)`` if ``fn`` is one chunk of ``ProcessPoolExecutor.map``, else None.

    ``map(chunksize=n)`` submits ``partial(_process_chunk, fn)`` per chunk (3.10 to 3.15).
    """
    if not isinstance(fn, functools.partial):
        return None
    chunk = _process_chunk()
    if chunk is None:
        moved("concurrent.futures.process._process_chunk",
              "items of one map() chunk now share one copy of the context")
        return None
    return fn.args if fn.func is chunk else None


def rechunk(fn: Callable[..., Any], item: Callable[..., Any]) -> Callable[..., Any]:
    """A map chunk that calls ``item(fn, *args)`` for each of its items."""
    chunk = _process_chunk()
    assert chunk is not None  # only called after map_chunk() recognised one
    return functools.partial(chunk, functools.partial(item, fn))


@functools.cache
def _work_item_run() -> CodeType | None:
    from concurrent.futures import thread

    run = getattr(getattr(thread, "_WorkItem", None), "run", None)
    return getattr(run, "__code__", None)


def work_item_callable(frame: FrameType) -> object | None:
    """The callable a pool worker runs, if ``frame`` is the stdlib's ``_WorkItem.run``.

    ``_WorkItem`` holds it as ``fn`` up to 3.13 and as ``task = (fn, args, kwargs)`` from
    3.14 on.
    """
    code = _work_item_run()
    if code is None:
        moved("concurrent.futures.thread._WorkItem.run",
              "debug.live() cannot show the spans of pool workers")
        return None
    if frame.f_code is not code:
        return None
    item = frame.f_locals.get("self")
    fn: object = getattr(item, "fn", None)
    if fn is not None:
        return fn
    task = getattr(item, "task", None)
    if isinstance(task, tuple) and task:
        fn = task[0]
        return fn
    moved("concurrent.futures.thread._WorkItem", "debug.live() cannot show the spans of "
          "pool workers")
    return None


def enclosing_task(frame: FrameType | None) -> tuple[Any, object] | None:
    """``(future, callable)`` of the pool task running on this thread below ``frame``, if any.

    Reads ``_WorkItem.run``'s ``self``: its ``future`` and the callable (``fn`` or ``task``).
    """
    code = _work_item_run()
    while frame is not None and code is not None:
        if frame.f_code is code:
            fn = work_item_callable(frame)
            future = getattr(frame.f_locals.get("self"), "future", None)
            return None if future is None else (future, getattr(fn, "__self__", None))
        frame = frame.f_back
    return None


# -- concurrent.futures.interpreter (3.14+) --------------------------------------------------


def direct_interpreter_context(initializer: object, initargs: tuple[Any, ...],
                               fn: Callable[..., Any], entry: Callable[..., Any]) -> Any:
    """An InterpreterPoolExecutor's ``prepare_context()``, for workers that call ``entry``.

    The stdlib's worker runs each task as ``interp.call(do_call, results, fn, args,
    kwargs)``, and ``Interpreter.call`` converts every argument on its own: a function and
    a dict each cost a pickle, after a failed try to share them. A task of ``fn`` (the
    pool's own, whose arguments are shareable) runs as ``interp.call(entry, results,
    *args)`` instead; ``entry`` calls ``do_call`` there, so an exception reaches the
    future as the stdlib's pool sends it. Reads ``WorkerContext`` (``prepare``, ``run``,
    ``interp``, ``results``); None, and the stdlib's workers, if it moved.
    """
    worker = _direct_worker(fn, entry)
    return None if worker is None else worker.prepare(initializer, initargs)


@functools.cache
def _direct_worker(fn: Callable[..., Any], entry: Callable[..., Any]) -> Any:
    from concurrent import interpreters  # type: ignore[attr-defined,unused-ignore]
    from concurrent.futures import interpreter  # type: ignore[attr-defined,unused-ignore]

    base = getattr(interpreter, "WorkerContext", None)
    if not (isinstance(base, type) and callable(getattr(base, "prepare", None))
            and callable(getattr(base, "run", None)) and interpreter_do_call() is not None):
        moved("concurrent.futures.interpreter.WorkerContext", "each task sent to a "
              "subinterpreter pays the stdlib's conversion of its function and arguments")
        return None
    failed = interpreters.ExecutionFailed

    class Direct(base):  # type: ignore[valid-type,misc]
        def run(self, task: tuple[Any, ...]) -> Any:
            call, args, kwargs = task
            interp, results = getattr(self, "interp", None), getattr(self, "results", None)
            if call is not fn or kwargs or interp is None or results is None:
                return super().run(task)  # an initializer, or a worker not as expected
            try:
                return interp.call(entry, results, *args)
            except failed as wrapper:  # as the stdlib's run: do_call sent the exception
                exc = results.get()
                if exc is None:  # it could not be shared
                    raise
                raise exc from wrapper

    return Direct


@functools.cache
def interpreter_do_call() -> Callable[..., Any] | None:
    """``concurrent.futures.interpreter.do_call``: how a pool's subinterpreter runs a task."""
    from concurrent.futures import interpreter  # type: ignore[attr-defined,unused-ignore]

    return getattr(interpreter, "do_call", None)


# -- threading and asyncio ------------------------------------------------------------------


def thread_context(thread: threading.Thread) -> Context | None:
    """The Context a 3.14+ thread runs in (``Thread._context``); None before 3.14.

    From 3.14 on a finished Thread object keeps that Context, and so whatever was current
    in it when the thread ended.
    """
    if sys.version_info < (3, 14):
        return None
    ctx = getattr(thread, "_context", None)
    if ctx is None or isinstance(ctx, Context):
        return ctx
    moved("threading.Thread._context", "a span scope exited after its thread finished stays "
          "reachable from the Thread object")
    return None


def start_in_empty_context(thread: threading.Thread) -> None:
    """Have a 3.14+ thread that was given no context start in an empty one.

    Under ``thread_inherit_context`` ``start()`` would give it a copy of the starter's
    context, which the Thread object keeps after the thread finishes. A thread that runs
    its work in a snapshot of its own needs none of it.
    """
    if sys.version_info < (3, 14):
        return
    if not hasattr(thread, "_context"):
        moved("threading.Thread._context", "a finished propagate.Thread object may keep a "
              "copy of its starter's context")
    elif thread._context is None:
        thread._context = Context()


def default_executor(loop: object) -> object | None:
    """The loop's default executor, if it has made or been given one."""
    return getattr(loop, "_default_executor", None)


# -- opentelemetry-instrumentation-threading ------------------------------------------------

_OTEL_THREADING = "opentelemetry.instrumentation.threading"


def otel_threading_unwrapped(obj: Any) -> Any:
    """``obj`` freed of what OpenTelemetry's threading instrumentor put around it, if anything.

    ``ThreadingInstrumentor`` wraps ``Thread.start``, ``Thread.run``, ``Timer.start``,
    ``Timer.run`` and ``ThreadPoolExecutor.submit`` in wrapt ``FunctionWrapper``s: peeled
    here through their public ``__wrapped__``, recognised by wrapt's ``_self_wrapper`` (the
    wrapper function, defined in that module). Its ``submit`` wrapper hands the pool a
    closure, ``wrapped_func``, that attaches the submitter's OpenTelemetry context around
    the task: its ``original_func`` is returned instead. Tested on
    opentelemetry-instrumentation-threading 0.66b1 and wrapt 2.5; where the closure moved,
    ``obj`` is returned as it is, with a warning (the task is then bound twice: right, but
    slower).
    """
    while getattr(getattr(obj, "_self_wrapper", None), "__module__", None) == _OTEL_THREADING \
            and hasattr(obj, "__wrapped__"):
        obj = obj.__wrapped__
    if getattr(obj, "__module__", None) != _OTEL_THREADING \
            or getattr(obj, "__name__", None) != "wrapped_func":
        return obj
    code, cells = getattr(obj, "__code__", None), getattr(obj, "__closure__", None) or ()
    names = getattr(code, "co_freevars", ())
    if "original_func" not in names or len(names) != len(cells):
        moved(f"{_OTEL_THREADING}'s submit wrapper (original_func)", "tasks submitted to a "
              "ThreadPoolExecutor are bound by it as well as by propagate")
        return obj
    return cells[names.index("original_func")].cell_contents


def splice_out(attribute: object, replaced: dict[int, object]) -> None:
    """Rewire each wrapt proxy in ``attribute``'s chain that wraps a key of ``replaced``
    (by ``id``) to wrap that key's value instead.

    For `propagate.uninstrument` when another instrumentation (OpenTelemetry's threading
    one) wrapped a method propagate patched: its wrapper stays, around the stdlib's method,
    so it can still unwrap itself. Sets wrapt's ``__wrapped__``; warns where that fails.
    """
    node = attribute
    for _ in range(64):  # a chain of wrappers, never a cycle: bounded all the same
        inner = getattr(node, "__wrapped__", None)
        if inner is None:
            return
        if id(inner) in replaced:
            try:
                node.__wrapped__ = replaced[id(inner)]  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                moved("wrapt's ObjectProxy.__wrapped__ (writable)", "a wrapper put over "
                      "propagate.instrument()'s methods keeps calling them after uninstrument()")
            return
        node = inner


# -- logging ----------------------------------------------------------------------------------


def logger_cache(logger: object) -> dict[Any, Any] | None:
    """A logger's level cache (``Logger._cache``, 3.7 to 3.15), which ``setLevel``,
    ``logging.disable`` and ``dictConfig`` clear on every logger; None where it moved.
    """
    cache = getattr(logger, "_cache", None)
    if not isinstance(cache, dict):
        moved("logging.Logger._cache", "relay_logs reads the submitter's logger levels at "
              "every submit")
        return None
    return cache


# -- multiprocessing ------------------------------------------------------------------------


def forking_reducers() -> dict[type, Callable[[Any], Any]]:
    """The reducers registered with ``ForkingPickler.register`` (its ``_extra_reducers``).

    Its own (pipes, sockets, methods, partials) and any a user registered. Empty, with a
    warning, where a release moved them: cloudpickle then sends what it can without them.
    """
    from multiprocessing.reduction import ForkingPickler

    extra = getattr(ForkingPickler, "_extra_reducers", None)
    if not isinstance(extra, dict):
        moved("multiprocessing.reduction.ForkingPickler._extra_reducers",
              "tasks that cloudpickle sends lose multiprocessing's reducers (pipes, sockets)")
        return {}
    return extra


@functools.cache
def pure_forking_reducers() -> frozenset[Callable[[Any], Any]]:
    """The reducers multiprocessing registers that have no effects: methods and partials.

    The others (pipes and sockets duplicate a descriptor and register it to be sent) must
    not run for a pickle that is thrown away.
    """
    from multiprocessing import reduction

    names = ("_reduce_method", "_reduce_method_descriptor", "_reduce_partial")
    return frozenset(f for f in (getattr(reduction, n, None) for n in names) if f is not None)


# -- opentelemetry-api and -sdk: tracers and meters by reference ----------------------------


def otel_by_reference(obj: object) -> tuple[Any, ...] | None:
    """If ``obj`` is a tracer or meter: a reduction that gets it from the receiver's provider.

    Meters name their scope publicly (``name``, ``version``, ``schema_url``); tracers do not:
    this reads the SDK's ``Tracer._instrumentation_scope``, or the API proxy's
    ``_instrumenting_module_name``, ``_instrumenting_library_version``, ``_schema_url`` and
    ``_attributes``.
    """
    kind = type(obj)
    if not kind.__module__.startswith("opentelemetry."):
        return None
    if kind.__name__ in ("Tracer", "ProxyTracer"):
        from opentelemetry.trace import get_tracer

        scope = getattr(obj, "_instrumentation_scope", None)
        if scope is not None:
            fields = (scope.name, scope.version, scope.schema_url, _plain(scope.attributes))
        elif hasattr(obj, "_instrumenting_module_name"):
            fields = (obj._instrumenting_module_name,
                      getattr(obj, "_instrumenting_library_version", None),
                      getattr(obj, "_schema_url", None), _plain(getattr(obj, "_attributes", None)))
        else:
            moved(f"{kind.__module__}.{kind.__qualname__}._instrumentation_scope",
                  "a tracer in a task sent by value cannot be pickled")
            return None
        return _by_reference, (get_tracer, *fields)
    from opentelemetry.metrics import Meter, get_meter

    if isinstance(obj, Meter):
        return _by_reference, (get_meter, obj.name, obj.version or "", obj.schema_url, None)
    return None


def _plain(attributes: object) -> dict[str, Any] | None:
    return dict(attributes) if attributes else None  # type: ignore[call-overload]


def _by_reference(get: Callable[..., Any], name: str, version: str | None,
                  schema_url: str | None, attributes: dict[str, Any] | None) -> Any:
    return get(name, version, schema_url=schema_url, attributes=attributes)


# -- opentelemetry-sdk ----------------------------------------------------------------------


def span_processor(provider: object) -> Any | None:
    """The SDK provider's composite span processor (``TracerProvider._active_span_processor``)."""
    processor = getattr(provider, "_active_span_processor", None)
    if processor is None or not hasattr(processor, "on_end"):
        moved("opentelemetry.sdk.trace.TracerProvider._active_span_processor",
              "spans recorded in workers are not relayed to this process")
        return None
    return processor


def first_at_shutdown(provider: object, callback: Callable[[], None]) -> bool:
    """Have ``callback`` run when the SDK ``provider`` shuts down, before its own processors.

    Puts a span processor first in ``SynchronousMultiSpanProcessor._span_processors``, so
    what it ends still reaches the exporters. False (silently) for a provider that is not
    the SDK's.
    """
    if not hasattr(provider, "_active_span_processor"):
        return False
    try:
        from opentelemetry.sdk.trace import SpanProcessor
    except ImportError:
        return False
    multi = span_processor(provider)
    lock = getattr(multi, "_lock", None)
    if multi is None or lock is None or not isinstance(
            getattr(multi, "_span_processors", None), tuple):
        moved("opentelemetry.sdk.trace.SynchronousMultiSpanProcessor._span_processors",
              "spans exited elsewhere that wait for their thread may end after the provider "
              "shut down, and be dropped")
        return False

    class AtShutdown(SpanProcessor):
        def shutdown(self) -> None:
            callback()

    with lock:
        multi._span_processors = (AtShutdown(), *multi._span_processors)
    return True


def replace_span_processors(provider: object, processor: object) -> bool:
    """Make ``processor`` the provider's only span processor; False if that cannot be done.

    Reaches ``SynchronousMultiSpanProcessor._span_processors`` and its ``_lock`` (and the
    same of ``ConcurrentMultiSpanProcessor``). False, silently, for a provider built with
    another kind of active span processor: that is a choice, not a move.
    """
    multi = span_processor(provider)
    if type(multi).__name__ not in ("SynchronousMultiSpanProcessor",
                                    "ConcurrentMultiSpanProcessor"):
        return False
    lock = getattr(multi, "_lock", None)
    if multi is None or lock is None or not hasattr(multi, "_span_processors"):
        moved("opentelemetry.sdk.trace.SynchronousMultiSpanProcessor._span_processors",
              "a worker's inherited tracer provider keeps exporting on its own")
        return False
    with lock:
        multi._span_processors = (processor,)
    return True
