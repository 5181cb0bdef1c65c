"""How a task crosses to another process: pickled in the submitting thread, at submit.

Plain pickle first, because it is fast and is what the stdlib would do; cloudpickle only
when plain pickle refuses (lambdas, closures, local functions, a registered ContextVar
the function refers to). Failing here, before anything is queued, is the point: a task
that cannot cross must fail at ``submit``, never later inside a worker.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import cloudpickle

from . import _context, _private
from ._errors import ContextSerializationError, TaskSerializationError

PROTOCOL = pickle.HIGHEST_PROTOCOL


class _Pickler(cloudpickle.CloudPickler):  # type: ignore[misc]
    """cloudpickle, plus registered ContextVars by name (they cannot be pickled at all)."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is ContextVar:
            if _context.registered().get(obj.name) is not obj:
                raise TypeError(
                    f"ContextVar {obj.name!r} cannot cross to another process; "
                    "register it with propagate.register(var) so it travels by name")
            return _context.lookup, (obj.name,)
        return super().reducer_override(obj)


def _cloudpickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=PROTOCOL).dump(obj)
    return buffer.getvalue()


def dumps(fn: Callable[..., Any], payload: tuple[Any, ...], values: Mapping[str, object],
          main_by_value: bool = False) -> bytes:
    """Pickle a task's payload (which holds registered ``values``), naming what cannot cross.

    ``main_by_value``: the workers do not run our ``__main__``, so anything plain pickle
    would send by reference to it goes by value instead (as Dask itself does).
    """
    try:
        blob = pickle.dumps(payload, PROTOCOL)
    except Exception:  # plain pickle refuses; cloudpickle may not
        pass
    else:
        if not (main_by_value and b"__main__" in blob):
            return blob
    for name, value in values.items():
        try:
            _cloudpickle(value)
        except Exception as exc:
            raise ContextSerializationError(
                f"registered ContextVar {name!r} holds {value!r}, which cannot be pickled "
                f"for another process ({exc}); store something picklable in it, such as an id "
                "instead of a connection, lock or client") from exc
    try:
        return _cloudpickle(payload)
    except Exception as exc:
        raise TaskSerializationError(
            f"cannot pickle {describe(fn)} or its arguments for another process or interpreter: "
            f"{exc}") from exc


def loads(blob: bytes) -> Any:
    return pickle.loads(blob)


def describe(fn: Callable[..., Any]) -> str:
    """A callable's name as a span name and in messages: its qualified name."""
    chunk = _private.map_chunk(fn)  # ProcessPoolExecutor.map submits chunks of fn
    if chunk is not None:
        return describe(chunk[0])
    inner = getattr(fn, "func", fn)  # functools.partial
    name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
    return name if isinstance(name, str) else type(inner).__qualname__
