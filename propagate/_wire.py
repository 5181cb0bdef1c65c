"""How a task crosses to another process or interpreter, and what it carries.

A task is one tuple, the envelope: ``(WIRE, __version__, fn, args, kwargs, task,
context)``, handed to the pool spread as the arguments of ``run_detached`` (so a pending
task holds one tuple, as the stdlib's does), or as its one argument when wrapped (`Lazy`,
a blob). Its first two fields never move, so a worker on another release of propagate
refuses the task with both versions named (`opened`), instead of failing somewhere
inside an unpickler.

``context`` is the detached context and where to send spans, ``(identity, baggage,
values, origin)``: sealed, as plain pickle's bytes, when every registered value is an
immutable atom (`context`). The tasks of one request then carry the same bytes, pickled
once here, and a worker makes the Context they run in once (`_context.task_context`).

Three ways to send it:

* To the stdlib's process pool, lazily: `Lazy` is handed to ``submit`` untouched and
  pickled by the pool's feeder thread, with multiprocessing's own pickler, when the task
  is sent. So arguments cross exactly as the stdlib sends them (its reducers for pipes,
  sockets and shared memory, and the reducers users register), the parent holds no copy
  of a pending task, and what cannot be pickled fails on the task's future, as with the
  stdlib. Only when that pickler cannot send the task at all (lambdas, closures, local
  functions, registered ContextVars, tracers) does it fall back to cloudpickle.
* To a subinterpreter pool: a plainly sendable task whose fields plain pickle (the
  pickler that pool uses too) makes a small blob of goes as that blob, made at
  ``submit`` (`sealed`), since bytes are what the interpreter shares cheapest; any
  other as `Lazy`, pickled by the interpreter when the pool sends it.
* Everywhere else (Dask, loky: executors whose workers do not run our ``__main__``),
  eagerly, at ``submit``: plain pickle's blob, or cloudpickle's when plain pickle refuses
  or names ``__main__``, so a task that cannot cross fails there with
  `TaskSerializationError`.

Wherever cloudpickle is used, registered ContextVars go by name (`_context.lookup`) and
OpenTelemetry tracers and meters by reference to the worker's own provider, so a lambda
using a module-level ``tracer = trace.get_tracer(__name__)`` can be sent.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import reprlib
import sys
import threading
from collections import ChainMap
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from types import BuiltinFunctionType, FunctionType
from typing import Any

from . import _context, _private
from ._errors import ContextSerializationError, TaskSerializationError
from ._version import __version__

WIRE = 4  # the envelope's layout; 0.1 sent a bare blob, and had no number
PROTOCOL = pickle.HIGHEST_PROTOCOL


def envelope(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             task: Any, context: bytes | tuple[Any, ...]) -> tuple[Any, ...]:
    return (WIRE, __version__, fn, args, kwargs, task, context)


ContextFields = tuple[Any, Any, Mapping[str, object], Any]  # identity, baggage, values, origin


def context(identity: Any, baggage: Mapping[str, object], values: Mapping[str, object],
            origin: Any) -> bytes | ContextFields:
    """A task's context field: sealed (plain pickle's bytes) if its values are immutable atoms.

    Captures of one request give the same objects (`_otel.current_fields`, the shared
    empty values, the one origin): the bytes made for the last of them are given again.
    Mutable values stay a tuple, so that each task unpickles a copy of its own.
    """
    global _last_context
    last = _last_context
    if (last[0] is identity and last[1] is baggage and last[2] is values
            and last[3] is origin):
        sealed: bytes = last[4]
        return sealed
    for value in values.values():
        if type(value) not in _IMMUTABLE:
            return (identity, baggage, values, origin)
    sealed = pickle.dumps((identity, baggage, values, origin), PROTOCOL)
    _last_context = (identity, baggage, values, origin, sealed)
    return sealed


_last_context: tuple[Any, ...] = (False, None, None, None, b"")  # no capture is False


def context_fields(context: bytes | ContextFields) -> ContextFields:
    """``(identity, baggage, values, origin)``, from a task's context field."""
    return pickle.loads(context) if type(context) is bytes else context  # type: ignore[return-value]


def opened(task: object) -> tuple[Any, ...]:
    """The fields after the version, from a task as it arrived; refuses another release's.

    A blob that cannot be unpickled in a subinterpreter fails as the interpreter's own
    unpickling would have: ``NotShareableError``.
    """
    if not (type(task) is tuple and len(task) > 2 and task[0] == WIRE):
        theirs = (f"propagate {task[1]} (wire format {task[0]})"
                  if isinstance(task, tuple) and len(task) > 2
                  else "an older propagate (0.1, wire format 1)")
        raise RuntimeError(
            f"this task was sent by {theirs}, and this worker runs propagate {__version__} "
            f"(wire format {WIRE}): install the same release of propagate where tasks are "
            "submitted and where they run")
    if len(task) == 3:  # one blob after the versions
        try:
            return tuple(pickle.loads(task[2]))
        except Exception as exc:
            error = _not_shareable(exc)
            if error is None:
                raise
            raise error from exc
    return task[2:]


def _not_shareable(exc: Exception) -> Exception | None:
    """In a subinterpreter, what its own unpickling raises for ``exc``; None elsewhere."""
    interpreters: Any = sys.modules.get("concurrent.interpreters")  # loaded by its pool
    if interpreters is None or interpreters.get_current().id == interpreters.get_main().id:
        return None
    error: Exception = interpreters.NotShareableError(
        f"args not shareable: {type(exc).__name__}: {exc}")
    return error


# -- the lazy path: the stdlib's process pool pickles the task, when it sends it ------------


class Lazy:
    """A task's envelope, pickled only when the pool sends it.

    Reduces to the envelope itself when multiprocessing's pickler can send it (checked
    with `_sendable`, which writes nothing anywhere), so the outer pickler sends the
    arguments as the stdlib would; otherwise to a cloudpickle blob of the envelope.

    ``main`` says whether the workers find the submitter's ``__main__`` by name: a process
    pool's do (forked, or re-running the main script); a subinterpreter's only when
    ``__main__`` is a file it can run, not under ``python -c`` or in a REPL. Where they do
    not, a task naming ``__main__`` goes by cloudpickle, by value.
    """

    __slots__ = ("envelope", "main")

    def __init__(self, envelope: tuple[Any, ...], main: bool = True) -> None:
        self.envelope, self.main = envelope, main

    def __repr__(self) -> str:  # what a pool's error names when the task cannot be sent
        _, _, fn, args, kwargs = self.envelope[:5]
        shown = [_short.repr(a) for a in args]
        shown += [f"{key}={_short.repr(value)}" for key, value in kwargs.items()]
        return f"<propagate task {describe(fn)}({', '.join(shown)})>"

    def __reduce__(self) -> tuple[Any, ...]:
        if _sendable(self.envelope, self.main) is None:  # made only for what is not plain
            return tuple, (self.envelope,)
        try:
            blob = _cloudpickle(self.envelope[2:])
        except Exception as exc:
            raise _named(exc, self.envelope[2]) from None
        return _envelope_of, (self.envelope[:2], blob)


_short = reprlib.Repr()
_short.maxother = _short.maxstring = 80


def main_is_a_file() -> bool:
    """Whether another interpreter can find ``__main__`` by running its file."""
    return getattr(sys.modules.get("__main__"), "__file__", None) is not None


def _envelope_of(versions: tuple[Any, ...], blob: bytes) -> tuple[Any, ...]:
    return (*versions, blob)


def plainly_sendable(envelope: tuple[Any, ...], main: bool = True) -> bool:
    """True when any pickler surely sends ``envelope``: a shortcut past the trial.

    The fields propagate made are plain by construction (ints, strings, tuples of them);
    the user's must be plain data (a few hundred containers and items at most, of atoms)
    and functions found by their names where they were defined, which is what pickle
    itself checks before it sends a function by name. Anything else (say False) goes to
    the trial, which walks what is bigger in C, not here in Python.
    """
    _, _, fn, args, kwargs, _, context = envelope
    if type(fn) not in _NAMED or not _by_name(fn, main):
        return False
    values = context[2] if type(context) is tuple else None  # sealed: atoms
    if not (args or kwargs or values):
        return True
    budget = [256]
    return (_plain(args, budget, main) and _plain(kwargs, budget, main)
            and (values is None or _plain(values, budget, main)))


def _plain(obj: Any, budget: list[int], main: bool) -> bool:
    kind = type(obj)
    if kind in _ATOMS:
        return True
    if kind is tuple or kind is list or kind is dict:
        budget[0] -= 1 + len(obj)
        if budget[0] < 0:
            return False
        if kind is dict:
            for key, value in obj.items():
                if type(key) is not str or (type(value) not in _ATOMS
                                            and not _plain(value, budget, main)):
                    return False
        else:
            for item in obj:
                if type(item) not in _ATOMS and not _plain(item, budget, main):
                    return False
        return True
    return kind in _NAMED and _by_name(obj, main)


_NAMED = (FunctionType, BuiltinFunctionType)  # what pickle sends by name, when found there


def _by_name(fn: FunctionType | BuiltinFunctionType, main: bool) -> bool:
    """Whether pickle finds ``fn`` by its name, in a module the receiver can import."""
    if not main and fn.__module__ == "__main__":
        return False
    found: object = sys.modules.get(fn.__module__)
    for part in fn.__qualname__.split("."):
        found = getattr(found, part, None)
    return found is fn


class _Discard:
    __slots__ = ()

    def write(self, data: Any) -> int:
        return len(data)


_DISCARD = _Discard()


class _MainWatch:
    """Discards what is written, noting whether it names ``__main__``."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def write(self, data: Any) -> int:
        if not self.seen and b"__main__" in data:
            self.seen = True
        return len(data)


class _Trial(pickle.Pickler):
    """multiprocessing's pickler, minus what a trial must not do: reducers with effects.

    Reducers for pipes and sockets duplicate a descriptor and register it to be sent, and
    a user's reducer may do anything: they are left for the real pickling. The method and
    partial reducers multiprocessing registers are pure, and run, so what they reach is
    checked too.
    """


_trial_tables: dict[int, ChainMap[Any, Any]] = {}


_trying = threading.local()


def in_trial() -> bool:
    """Whether this thread is pickling for a trial: reducers must not count it as a send."""
    return getattr(_trying, "active", False)


def sendable(obj: object) -> BaseException | None:
    """None if multiprocessing's pickler can send ``obj``, else what it raises."""
    return None if type(obj) in _ATOMS else _sendable(obj)


def _sendable(obj: object, main: bool = True) -> BaseException | None:
    """None if multiprocessing's pickler can send ``obj``, else what it raises.

    Without ``main``, naming ``__main__`` counts as unsendable (a `PicklingError`).
    """
    extra = _private.forking_reducers()
    table = _trial_tables.get(len(extra))
    if table is None:
        pure = _private.pure_forking_reducers()
        table = ChainMap({t: (r if r in pure else _no_effects) for t, r in extra.items()},
                         copyreg.dispatch_table)
        _trial_tables.clear()
        _trial_tables[len(extra)] = table
    sink = _DISCARD if main else _MainWatch()
    pickler = _Trial(sink, PROTOCOL)
    pickler.dispatch_table = table
    _trying.active = True
    try:
        pickler.dump(obj)
    except Exception as exc:
        return exc
    finally:
        _trying.active = False
    if isinstance(sink, _MainWatch) and sink.seen:
        return pickle.PicklingError("names __main__, which the receiver cannot run")
    return None


def _no_effects(obj: object) -> tuple[Any, ...]:
    return type(None), ()


def _named(exc: Exception, fn: Callable[..., Any]) -> Exception:
    """``exc``, the pickler's own, with a note naming the task that could not be sent."""
    note = f"when sending {describe(fn)}() or its arguments to another process"
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    return exc


# -- cloudpickle, with what it must know besides ------------------------------------------------


def reduce_contextvar(var: ContextVar[Any]) -> tuple[Any, ...]:
    """A ContextVar's reduction for another process: by name, if it is registered."""
    if _context.registered().get(var.name) is not var:
        raise TypeError(
            f"ContextVar {var.name!r} cannot cross to another process; "
            "register it with propagate.register(var) so it travels by name")
    return _context.lookup, (var.name,)


@functools.cache
def _pickler() -> Any:
    """cloudpickle, plus multiprocessing's reducers, registered ContextVars and tracers.

    Made on first use: cloudpickle is imported only when something needs it.
    """
    import cloudpickle

    class Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, ContextVar):
                return reduce_contextvar(obj)
            by_reference = _private.otel_by_reference(obj)
            if by_reference is not None:
                return by_reference
            reducer = _private.forking_reducers().get(type(obj))
            if reducer is not None:
                return reducer(obj)
            return super().reducer_override(obj)

    return Pickler


def _cloudpickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _pickler()(buffer, protocol=PROTOCOL).dump(obj)
    return buffer.getvalue()


def check_values(values: Mapping[str, object]) -> None:
    """Fail now, naming the variable, if a registered ContextVar's value cannot cross.

    The stdlib has no notion of these values, so the error is propagate's, at ``submit``.
    Checked with the trial pickler first, which sends nothing: values are small.
    """
    for name, value in values.items():
        if type(value) in _ATOMS or _sendable(value) is None:
            continue
        try:
            _cloudpickle(value)
        except Exception as exc:
            raise ContextSerializationError(
                f"registered ContextVar {name!r} holds {value!r}, which cannot be pickled "
                f"for another process ({exc}); store something picklable in it, such as an id "
                "instead of a connection, lock or client") from exc


_ATOMS = frozenset({str, int, float, bool, type(None), bytes, bytearray})
_IMMUTABLE = _ATOMS - {bytearray}


# -- the eager path: a blob, made at submit -----------------------------------------------------


def dumps(envelope: tuple[Any, ...], values: Mapping[str, object]) -> tuple[Any, ...]:
    """The envelope with everything after its versions as one blob, made now.

    For executors whose workers do not import our ``__main__``: plain pickle when it can
    and the blob names no ``__main__``, else cloudpickle, which sends by value what plain
    pickle would send by reference to it (as Dask itself does).
    """
    fields = envelope[2:]
    blob = _plain_blob(fields)
    if blob is not None:
        return (*envelope[:2], blob)
    if values:
        check_values(values)
    try:
        return (*envelope[:2], _cloudpickle(fields))
    except Exception as exc:
        raise TaskSerializationError(
            f"cannot pickle {describe(envelope[2])} or its arguments for another process or "
            f"interpreter: {exc}") from exc


SMALL = 1 << 16  # bytes: a pending task holds no bigger copy of its arguments


def sealed(envelope: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A plainly sendable envelope with its fields as one blob, for a subinterpreter, if small.

    ``Interpreter.call`` shares bytes (and tuples of them) as they are, but pickles every
    other argument on its own, with a pickler, an unpickler and a discarded exception
    each: the envelope's dicts and function would cost one each. None for a bigger task,
    so that no pending task holds a copy of big arguments, and for one that names
    ``__main__``, which a subinterpreter finds only through its own unpickling.
    """
    blob = _plain_blob(envelope[2:])
    return None if blob is None or len(blob) > SMALL else (*envelope[:2], blob)


def _plain_blob(fields: tuple[Any, ...]) -> bytes | None:
    """Plain pickle's blob of ``fields``, or None if it refuses or the blob names ``__main__``."""
    try:
        blob = pickle.dumps(fields, PROTOCOL)
    except Exception:  # plain pickle refuses; cloudpickle may not
        return None
    return None if b"__main__" in blob else blob


def describe(fn: Callable[..., Any]) -> str:
    """A callable's name as a span name and in messages: its qualified name."""
    chunk = _private.map_chunk(fn)  # ProcessPoolExecutor.map submits chunks of fn
    if chunk is not None:
        return describe(chunk[0])
    inner = getattr(fn, "func", fn)  # functools.partial
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
    return name if isinstance(name, str) else type(inner).__qualname__

