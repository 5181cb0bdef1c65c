"""Ray: Ray tasks behind a `concurrent.futures.Executor`, each in the submitter's context.

Needs the ``ray`` extra. Ray is imported when an executor is made, never by this module:
Ray's workers import it by name (for `_run`) and have Ray already.

A task is ``_run(sealed, *args, **kwargs)``. ``sealed`` is bytes, pickled by propagate
(`_executor.bind_detached`, since Ray's pickler cannot send a registered ContextVar): the
function, the detached context, and the task's number, which names its spans at home.
The user's arguments go to Ray as they are, so Ray resolves top-level ``ObjectRef``
arguments and sends arrays zero-copy, as for any Ray task; only plain data travels inside
``sealed`` instead, because Ray's cost grows with each argument (`_sealed`).

Ray may unpickle a result or an error many times, anywhere: in the driver (each
``ray.get``), in a task handed the ``ObjectRef``. So spans ride on them in a form that
unpickles everywhere as the bare value (`_Riding`), and are delivered only in the
process that submitted the task, and only while its number is still expected
(`_expected`): once, before the future resolves.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import importlib
import itertools
import pickle
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from . import _executor, _wire
from ._executor import Binding, Options, bind_detached, run_detached

__all__ = ["executor"]

P = ParamSpec("P")
T = TypeVar("T")

_NOT_CONNECTED = ("propagate.ray.executor() runs tasks on your Ray connection, and Ray is "
                  "not initialised: call ray.init() first (ray.init(address=...) to join a "
                  "cluster)")
_NO_KWARGS: dict[str, Any] = {}


def executor(*, task_spans: bool = False, link: bool = False, relay: bool = True,
             **remote_options: Any) -> cf.Executor:
    """Like ``ray.remote(**remote_options)`` tasks, but as an Executor whose tasks run in
    the submitter's context.

    Each ``submit(fn, *args, **kwargs)`` is one Ray task, with the options given here
    (``num_cpus``, ``resources``, ``max_retries``, ``retry_exceptions``,
    ``scheduling_strategy``...); its future resolves with the task's result, or raises
    the task's own exception (not Ray's ``RayTaskError``), whose ``__cause__`` holds the
    worker's traceback, as from a process pool. Arguments arrive as with any Ray task: a
    top-level ``ObjectRef`` resolved, an array zero-copy. Like Ray's
    ``ObjectRef.future()``, the future keeps its ``object_ref``, and is never ``running()``;
    unlike it, cancelling the future cancels the Ray task (``ray.cancel``).

    What crosses: the current span's trace identity (spans the task starts are its
    children), the baggage, and the values of ContextVars registered with
    `propagate.register`; changes made in the worker never flow back. The function goes
    with each task, pickled by propagate (cloudpickle where plain pickle cannot).

    With opentelemetry-sdk's tracer provider installed here and ``relay=True``, the spans
    a worker records come home to this process's span processors, exactly once, before
    the task's future resolves, with the worker's ``host.name`` and ``process.pid`` on
    their resource. To collect them, the first such task in a Ray worker takes over that
    worker's tracer provider (its exporters are replaced by the relay); ``relay=False``
    leaves the workers' own tracing alone. ``task_spans`` and ``link`` work as for
    `propagate.ThreadPoolExecutor`.

    Uses the Ray connection that ``ray.init()`` made: it raises `RuntimeError` without one.
    """
    ray = _ray()
    options = Options.checked(task_spans, link, relay, main_by_value=True)
    if remote_options.get("num_returns", 1) != 1:
        raise ValueError(f"num_returns must be 1, not {remote_options['num_returns']!r}: "
                         "each submit's future resolves with one result")
    remote = ray.remote(**remote_options)(_run) if remote_options else ray.remote(_run)
    if not ray.is_initialized():
        raise RuntimeError(_NOT_CONNECTED)
    return _Executor(ray, remote, options, remote_options)


def _ray() -> Any:
    """The ray module, loosely typed: its own annotations cover little of what is used here."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError("propagate.ray needs Ray: pip install 'propagate[ray]'") from exc


class _Future(cf.Future[Any]):
    """A Ray task's future: cancelling it cancels the task (Ray's own future does not)."""

    object_ref: Any  # as on Ray's ObjectRef.future()

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # Ray skips a task that has not started; one that has gets a KeyboardInterrupt.
        _ray().cancel(self.object_ref)
        return True


_numbers = itertools.count()
_expected: set[int] = set()  # tasks submitted here, by number, whose spans may still come


class _Executor(cf.Executor, Binding):
    """The executor `executor` makes: one Ray task per ``submit``."""

    def __init__(self, ray: Any, remote: Any, options: Options,
                 remote_options: dict[str, Any]) -> None:
        self._ray, self._remote, self._propagate = ray, remote, options
        self._task_error = ray.exceptions.RayTaskError
        self._shown = ", ".join(f"{k}={v!r}" for k, v in remote_options.items())
        self._pending: dict[_Future, cf.Future[Any]] = {}  # to cancel or wait for
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> cf.Future[T]:
        """Like ``Executor.submit``: ``fn(*args, **kwargs)`` as a Ray task, in this context."""
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not self._ray.is_initialized():  # or .remote() would start a Ray of its own
            raise RuntimeError(_NOT_CONNECTED)
        number = next(_numbers)
        sealed, ray_args, ray_kwargs = _sealed(fn, number, args, kwargs, self._propagate)
        future = _Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            _expected.add(number)
            try:
                future.object_ref = self._remote.remote(sealed, *ray_args, **ray_kwargs)
            except BaseException:
                _expected.discard(number)
                raise
            outcome = self._pending[future] = future.object_ref.future()
        outcome.add_done_callback(functools.partial(self._settle, future, number))
        return future

    def _settle(self, future: _Future, number: int, outcome: cf.Future[Any]) -> None:
        """Resolve ``future`` from Ray's (run on Ray's callback thread, spans delivered)."""
        _expected.discard(number)
        self._pending.pop(future, None)
        if not future.set_running_or_notify_cancel():  # cancelled: wait() hears of it now
            return
        error = outcome.exception()
        if error is None:
            future.set_result(outcome.result())
        else:
            future.set_exception(_unwrapped(error, self._task_error))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new tasks; with ``cancel_futures``, cancel the unfinished ones (Ray
        interrupts those already running); with ``wait``, wait until every task has ended."""
        with self._lock:
            self._shutdown = True
            pending = self._pending.copy()
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            cf.wait([*pending, *pending.values()])

    def __repr__(self) -> str:
        return f"<propagate.ray.executor({self._shown})>"


def _sealed(fn: Callable[..., Any], number: int, args: tuple[Any, ...], kwargs: dict[str, Any],
            options: Options) -> tuple[bytes, tuple[Any, ...], dict[str, Any]]:
    """The task's first argument, bytes (which Ray sends cheapest), and the others for Ray.

    Ray pays for each argument it is given, so arguments that are plain data (numbers,
    strings, bytes, a few hundred of them in lists, tuples and dicts: what any pickler sends
    alike) go inside, after the task's number, if that keeps the task small. Any other (an
    ``ObjectRef``, an array, an object) goes to Ray as it is: Ray resolves top-level refs
    and sends arrays zero-copy; and so do big arguments, which Ray puts in its object store.
    """
    budget = [256]
    if _wire._plain(args, budget, True) and _wire._plain(kwargs, budget, True):
        _, (envelope,), _ = bind_detached(fn, (number, *args), kwargs, options)
        sealed = pickle.dumps(envelope, _wire.PROTOCOL)
        if len(sealed) <= _wire.SMALL:
            return sealed, (), _NO_KWARGS
    _, (envelope,), _ = bind_detached(fn, (number,), _NO_KWARGS, options)
    return pickle.dumps(envelope, _wire.PROTOCOL), args, kwargs


class _RemoteTraceback(Exception):
    """The worker's traceback as the cause of its exception, as the stdlib's process pool
    gives it (``concurrent.futures.process._RemoteTraceback``)."""

    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the traceback's first line


def _unwrapped(error: BaseException, task_error: type[BaseException]) -> BaseException:
    """The user's exception from Ray's ``RayTaskError``, with Ray's traceback as its cause;
    any other error (a dead worker, a cancelled task) as it is."""
    cause = getattr(error, "cause", None)
    if not isinstance(error, task_error) or not isinstance(cause, BaseException):
        return error
    cause.__cause__ = _RemoteTraceback(f'\n"""\n{_ANSI.sub("", str(error))}\n"""')
    return cause


# -- in the Ray worker -----------------------------------------------------------------------


def _run(sealed: bytes, /, *args: Any, **kwargs: Any) -> Any:
    """The Ray task: ``fn(*args, **kwargs)`` in the detached context ``sealed`` carries.

    ``args`` and ``kwargs`` are the user's, as Ray hands them over (a top-level
    ``ObjectRef`` resolved). The spans the core's relay puts on the outcome are moved
    to where they survive Ray pickling it more than once, under the task's number.
    """
    envelope = pickle.loads(sealed)
    fn, inside, inside_kwargs, task, context = _wire.opened(envelope)
    number = inside[0]
    if len(inside) > 1 or inside_kwargs:  # the user's arguments came inside (see _sealed)
        args, kwargs = inside[1:], inside_kwargs
    try:
        outcome = run_detached(*envelope[:2], fn, args, kwargs, task, context)
    except BaseException as exc:
        _ride_on_exception(exc, number)
        raise
    relay: Any = sys.modules.get("propagate._relay")  # not loaded: no spans to carry
    if relay is not None and type(outcome) is relay.Reply:
        return _Riding(_Arrival(number, outcome.delivery), outcome.result)
    return outcome


def _ride_on_exception(exc: BaseException, number: int) -> None:
    """Let the spans `_relay.stash` put on ``exc`` go on every trip, under the task's number.

    The core's carriers go home once, on the first pickling; Ray pickles the exception
    twice (``RayTaskError`` checks that it can, then sends it).
    """
    relay: Any = sys.modules.get("propagate._relay")
    if relay is None:  # not loaded: nothing was stashed
        return
    state = vars(exc)
    carry: Any = state.get("__reduce_ex__")
    spans: Any = state.get(relay._KEY)
    if isinstance(carry, relay._Carry):
        carry.delivery = _Arrival(number, carry.delivery)
        state["__reduce_ex__"] = _Again(carry)
    elif isinstance(spans, relay._Spans) and spans.delivery is not None:
        state[relay._KEY] = _Riding(_Arrival(number, spans.delivery), spans.suppress)


class _Again:
    """The core's `_relay._Carry`, put back on the exception after each trip."""

    __slots__ = ("carry",)

    def __init__(self, carry: Any) -> None:
        self.carry = carry

    def __call__(self, protocol: int) -> Any:
        reduced = self.carry(protocol)  # takes itself off the exception
        vars(self.carry.exc)["__reduce_ex__"] = self
        return reduced


class _Arrival:
    """A task's spans on their way home, pickled ahead of the value they ride on."""

    __slots__ = ("delivery", "number")

    def __init__(self, number: int, delivery: Any) -> None:
        self.number, self.delivery = number, delivery

    def __reduce__(self) -> tuple[Any, ...]:
        d = self.delivery
        return _arrived, (self.number, d.origin, d.source, d.spans)


def _arrived(number: int, origin: Any, source: Any, spans: list[Any]) -> None:
    """Deliver the spans if this is where the task was submitted and they are still
    expected: the first unpickling there before the future resolves."""
    relay: Any = _executor._relay_module()
    if relay and origin == relay.here() and _claimed(number):
        relay.deliver(source, spans)


def _claimed(number: int) -> bool:
    try:
        _expected.remove(number)
    except KeyError:
        return False
    return True


class _Riding:
    """A value with spans riding on it: unpickles anywhere as the bare value."""

    __slots__ = ("arrival", "value")

    def __init__(self, arrival: _Arrival, value: Any) -> None:
        self.arrival, self.value = arrival, value

    def __reduce__(self) -> tuple[Any, ...]:
        return _value, (self.arrival, self.value)


def _value(arrival: None, value: T) -> T:
    return value
