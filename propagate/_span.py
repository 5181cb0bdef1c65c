"""Thread-affine span scopes: ``span()`` and the ``trace`` decorator.

OpenTelemetry's ``detach(token)`` only works in the Context that attached: anywhere else
it logs "Failed to detach context" and leaves the entering thread's current span stuck
on a span that has ended (opentelemetry-python #2606). A `span` scope remembers the
thread and Context that entered it, and an exit anywhere else is handled instead of
attempted:

* the span is ended exactly once, and never on another thread while its entering
  Context can still run there: the end time and error are recorded at the exit and the
  span is ended on the entering thread when that thread heals (below), or when that
  Context ends (the pool task, thread or asyncio task it belongs to finishes); if it has
  already ended, the span is ended at the exit;
* the foreign context is not touched, nothing is logged, and a `CrossThreadExitWarning`
  names both threads (and asyncio tasks);
* **healing**: the entering Context still has the span as its current one. At its next
  propagate call (entering or exiting a scope, ``submit``, ``wrap``, ``capture``,
  ``to_thread``...) on the entering thread, in the entering Context, it is reset to what
  it was before the span, provided the span's context is still the current one there
  (the rule of `propagate._heal`, which the runtime context follows too).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import inspect
import sys
import threading
import time
import warnings
import weakref
from collections.abc import AsyncGenerator, Callable, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _otel, _private
from ._errors import CrossThreadExitWarning
from ._heal import reset_here, undo
from ._otel import Attributes, Span, SpanKind, Tracer

if not TYPE_CHECKING:  # for typing.get_type_hints(trace): see _otel
    from ._otel import AnyValue  # noqa: F401

if TYPE_CHECKING:
    import asyncio

F = TypeVar("F", bound=Callable[..., Any])

orphans: dict[int, list[_Scope]] = {}  # by entering thread: scopes exited elsewhere
_lock = threading.Lock()


class Life:
    """Whether a Context that a pool task, thread or ``wrap`` call runs in has ended."""

    __slots__ = ("over", "thread")

    def __init__(self) -> None:
        self.over = False
        self.thread = threading.get_ident()


# Set in a Context by the first scope entered there (a copy made on another thread, as
# a pool's snapshot is, gets its own); marked over when the task it runs ends.
life: contextvars.ContextVar[Life | None] = contextvars.ContextVar("propagate.life",
                                                                   default=None)


def _life_here() -> Life:
    here = life.get()
    if here is None or here.over or here.thread != threading.get_ident():  # not this one's
        here = Life()
        life.set(here)
        _watch(here)
    return here


def _watch(here: Life) -> None:
    """If this Context is a pool task's snapshot, have the task's future end it."""
    task = _private.enclosing_task(sys._getframe(2))
    if task is not None:
        future, ctx = task
        if isinstance(ctx, contextvars.Context) and ctx.get(life) is here:  # it is this one
            future.add_done_callback(functools.partial(_ended, here))


def _ended(here: Life, future: object) -> None:
    end_of_context(here)


def _current_task() -> asyncio.Task[Any] | None:
    running = sys.modules.get("asyncio")  # not imported: no task can be running
    if running is None:
        return None
    try:
        task: asyncio.Task[Any] | None = running.current_task()
    except RuntimeError:  # no running loop in this thread
        return None
    return task


def _describe(thread: threading.Thread, task: asyncio.Task[Any] | None) -> str:
    return f"thread {thread.name!r}" + (f", task {task.get_name()!r}" if task else "")


def _reset(token: object) -> bool:
    """Reset ``token`` if this is the Context that made it; never log, never raise."""
    if type(token) is tuple:  # propagate's runtime context's: the Token and what it set
        token = token[0]
    if isinstance(token, contextvars.Token):
        return reset_here(token)
    _otel.detach(token)  # a non-contextvars runtime
    return True


class _Scope:
    __slots__ = ("attached", "end_time", "life", "span", "task", "thread", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.attached = _otel.in_context(span)
        self.token = _otel.attach(self.attached)
        self.thread = threading.current_thread()
        task = _current_task()
        self.task = None if task is None else weakref.ref(task)
        self.life = _life_here()
        self.end_time: int | None = None  # set while an end waits for the entering thread

    def exit(self) -> None:
        if _reset(self.token):
            self.span.end()
            return
        task = None if self.task is None else self.task()
        message = (
            f"span {getattr(self.span, 'name', '')!r} entered on "
            f"{_describe(self.thread, task)} was exited on "
            f"{_describe(threading.current_thread(), _current_task())}; it is ended, and the "
            "entering context is restored at its next propagate call")
        if threading.current_thread() is self.thread:
            self.span.end()
            self._orphan()
        elif self.life.over or not self.thread.is_alive():  # nothing left to heal or end it
            self.end_time = time.time_ns()
            self.end()
        else:
            self.end_time = time.time_ns()
            self._orphan()
        # last: under "warnings as errors" this raises, and the span must be dealt with first
        warnings.warn(CrossThreadExitWarning(message), stacklevel=3)  # the exiting line

    def _restore_finished_thread(self) -> None:
        """From 3.14 a finished Thread keeps its Context: take the ended span out of it."""
        ctx = _private.thread_context(self.thread)
        if ctx is None:
            return
        with contextlib.suppress(RuntimeError):  # entered somewhere after all: let it heal
            ctx.run(undo, [self], _otel.get_current)

    def reset(self) -> bool:
        """Undo this scope's attach if this is the Context that made it (see `heal`)."""
        return _reset(self.token)

    def _orphan(self) -> None:
        global _exit_hook
        with _lock:
            if not _exit_hook:  # registered late, after the SDK's own hook, so it runs first
                _exit_hook = True
                atexit.register(_end_abandoned)
                # and an explicit provider.shutdown() ends them first, while they can export
                _private.first_at_shutdown(_otel.provider(), _end_abandoned)
            orphans.setdefault(self.thread.ident or 0, []).append(self)
            gone = _take(lambda scope: scope.gone())
        _end(gone)

    def gone(self) -> bool:
        """Whether the entering Context can never run again: its thread or task finished."""
        return self.life.over or not self.thread.is_alive() or self.abandoned()

    def abandoned(self) -> bool:
        """Whether nothing can heal this scope any more: its entering task has finished."""
        task = None if self.task is None else self.task()
        return self.task is not None and (task is None or task.done())

    def end(self) -> None:
        if self.end_time is not None:
            self.span.end(end_time=self.end_time)
            self.end_time = None
        if not self.thread.is_alive():
            self._restore_finished_thread()


_exit_hook = False


def heal() -> None:
    """Heal this thread's Context from scopes that were exited elsewhere (see module doc)."""
    if not orphans:
        return
    ident = threading.get_ident()
    with _lock:
        scopes = orphans.get(ident)
        if not scopes:
            return
        done = undo(scopes, _otel.get_current)  # the entering Context, if this is it
        done += [scope for scope in scopes if scope not in done and scope.abandoned()]
        _drop(ident, done)
    _end(done)


def end_of_context(ended: Life) -> None:
    """A Context ends for good (its task's): end the scopes left open in it, right here.

    Called on the entering thread: at the end of the call (`_executor.settled`) or by the
    task's future, which the pool resolves on its worker thread.
    """
    ended.over = True
    if not orphans:
        return
    with _lock:
        done = _take(lambda scope: scope.life is ended)
    _end(done)


def _take(condition: Callable[[_Scope], bool]) -> list[_Scope]:
    """Under ``_lock``: remove and return every orphan for which ``condition`` holds."""
    taken = []
    for ident, scopes in list(orphans.items()):
        done = [scope for scope in scopes if condition(scope)]
        _drop(ident, done)
        taken += done
    return taken


def _drop(ident: int, done: list[_Scope]) -> None:
    """Under ``_lock``: forget ``done`` among ``ident``'s orphans."""
    if done:
        orphans[ident] = [scope for scope in orphans[ident] if scope not in done]
        if not orphans[ident]:
            del orphans[ident]


def _end(scopes: list[_Scope]) -> None:
    for scope in scopes:  # outside the lock: a span processor may call back into propagate
        scope.end()


def _end_abandoned() -> None:
    """Spans whose entering thread never healed still end: at exit, or as the provider
    shuts down (whichever comes first), never after it."""
    with _lock:
        scopes = [scope for pending in orphans.values() for scope in pending]
        orphans.clear()
    for scope in scopes:
        scope.end()


def _options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """``start_as_current_span``'s keywords, as ``start_span``'s and the two error flags."""
    start = dict(kwargs)
    return (start, start.pop("record_exception", True),
            start.pop("set_status_on_exception", True))


class span:
    """Like ``tracer.start_as_current_span(name, **kwargs)``, but exiting elsewhere is safe.

    Starts a span, makes it current, and remembers the thread and Context that entered
    it. Exit there works as usual. Exit anywhere else ends the span exactly once, touches
    nothing in the foreign context, logs nothing, and warns with `CrossThreadExitWarning`.
    The span is ended on the entering thread, with the exit's end time and error, when
    that thread next calls propagate (entering or exiting a scope, ``submit``, ``wrap``,
    ``capture``...) in the entering Context, which then stops having it as its current
    span; or when that Context's task or thread finishes, whichever comes first.

    ``tracer`` starts the span (by default propagate's own, instrumentation scope
    ``propagate``): a library passes its own, so its spans keep its instrumentation
    scope. The other keyword arguments are ``start_as_current_span``'s (``kind``,
    ``attributes``, ``links``, ``start_time``, ``record_exception``,
    ``set_status_on_exception``...). Like ``start_as_current_span``, it also decorates:
    each call of the decorated function runs in a new span (see `trace`).
    """

    __slots__ = ("_record", "_scope", "_set_status", "kwargs", "name", "tracer")

    def __init__(self, name: str, *, tracer: Tracer | None = None, **kwargs: Any) -> None:
        self.name: str = name
        """The name the span is started with."""
        self.tracer: Tracer | None = tracer
        """The tracer that starts it; None for propagate's own."""
        self.kwargs: dict[str, Any] = kwargs
        """The other keyword arguments, as given."""
        self._scope: _Scope | None = None

    def __enter__(self) -> Span:
        if self._scope is not None:
            raise RuntimeError(f"span {self.name!r} is already entered; make a new span() scope")
        heal()
        start, self._record, self._set_status = _options(self.kwargs)
        self._scope = _Scope(_otel.start(self.name, self.tracer, **start))
        return self._scope.span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        scope, self._scope = self._scope, None
        if scope is None:
            raise RuntimeError(f"span {self.name!r} was exited without being entered")
        if exc is not None:
            _otel.fail(scope.span, exc, self._record, self._set_status)
        scope.exit()
        heal()

    def __call__(self, fn: F) -> F:
        """Decorate ``fn``: each call runs in a span started as this one would be."""
        return _decorate(fn, self.name, self.tracer, self.kwargs)


def _traced_generator(fn: Callable[..., Generator[Any, Any, Any]], name: str,
                      tracer: Tracer | None, options: dict[str, Any]) -> Callable[..., Any]:
    start, record, set_status = _options(options)

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        heal()
        s = _otel.start(name, tracer, **start)
        try:
            gen = fn(*args, **kwargs)
            method: Callable[[Any], Any] = gen.send
            value: Any = None
            while True:
                try:
                    with _otel.current(s):  # current for one step, never across a yield
                        item = method(value)
                except StopIteration as stop:
                    return stop.value
                method, value = gen.send, None
                try:
                    value = yield item
                except GeneratorExit:
                    gen.close()
                    raise
                except BaseException as exc:  # thrown in by the consumer: pass it on
                    method, value = gen.throw, exc
        except BaseException as exc:
            _otel.fail(s, exc, record, set_status)
            raise
        finally:
            s.end()

    return traced


def _traced_async_generator(fn: Callable[..., AsyncGenerator[Any, Any]], name: str,
                            tracer: Tracer | None, options: dict[str, Any]) -> Callable[..., Any]:
    start, record, set_status = _options(options)

    @functools.wraps(fn)
    async def traced(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        heal()
        s = _otel.start(name, tracer, **start)
        try:
            agen = fn(*args, **kwargs)
            method: Callable[[Any], Any] = agen.asend
            value: Any = None
            while True:
                try:
                    with _otel.current(s):  # current for one step, never across a yield
                        item = await method(value)
                except StopAsyncIteration:
                    return
                method, value = agen.asend, None
                try:
                    value = yield item
                except GeneratorExit:
                    await agen.aclose()
                    raise
                except BaseException as exc:  # thrown in by the consumer: pass it on
                    method, value = agen.athrow, exc
        except BaseException as exc:
            _otel.fail(s, exc, record, set_status)
            raise
        finally:
            s.end()

    return traced


def _decorate(fn: F, name: str | None, tracer: Tracer | None, options: dict[str, Any]) -> F:
    name = name or fn.__qualname__
    if inspect.isasyncgenfunction(fn):
        return _traced_async_generator(fn, name, tracer, options)  # type: ignore[return-value]
    if inspect.isgeneratorfunction(fn):
        return _traced_generator(fn, name, tracer, options)  # type: ignore[return-value]
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def traced_coroutine(*args: Any, **kwargs: Any) -> Any:
            with span(name, tracer=tracer, **options):
                return await fn(*args, **kwargs)

        return traced_coroutine  # type: ignore[return-value]

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with span(name, tracer=tracer, **options):
            return fn(*args, **kwargs)

    return traced  # type: ignore[return-value]


@overload
def trace(fn: F, *, name: str | None = None, tracer: Tracer | None = None,
          attributes: Attributes = None, kind: SpanKind | None = None) -> F: ...
@overload
def trace(fn: None = None, *, name: str | None = None, tracer: Tracer | None = None,
          attributes: Attributes = None, kind: SpanKind | None = None) -> Callable[[F], F]: ...


def trace(fn: F | None = None, *, name: str | None = None, tracer: Tracer | None = None,
          attributes: Attributes = None, kind: SpanKind | None = None,
          ) -> F | Callable[[F], F]:
    """Decorate a function, coroutine function, generator or async generator with a span.

    The span is named after the function (its ``__qualname__``) unless ``name`` is given,
    and is a child of the span current where the call starts running: traced coroutines
    gathered together are siblings under the caller's span. A generator's span is
    current only while the generator body runs, never across a ``yield``, so closing it
    from another task or thread corrupts nothing; it ends when the generator finishes
    or is closed, wherever that happens.

    ``tracer`` starts the spans (by default propagate's own): a library passes its own,
    so its spans keep its instrumentation scope. ``attributes`` and ``kind`` are given to
    each span at its start.
    """
    options: dict[str, Any] = {}
    if attributes is not None:
        options["attributes"] = attributes
    if kind is not None:
        options["kind"] = kind
    if fn is None:
        return lambda f: _decorate(f, name, tracer, options)
    return _decorate(fn, name, tracer, options)
