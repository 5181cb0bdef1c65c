"""Task functions for the Ray tests, importable by name in Ray's worker processes.

Ray's workers start in the driver's working directory, with it on ``sys.path``, so they
import this module by name; a function defined in a test would cross by value and hide
import-time behaviour (the registration of `REQUEST_ID` here) from the test.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from contextvars import ContextVar
from typing import Any

from opentelemetry import baggage, context, trace

import propagate

REQUEST_ID: ContextVar[str] = propagate.register(ContextVar("tests.ray.request_id"))
UNREGISTERED: ContextVar[str] = ContextVar("tests.ray.unregistered", default="worker")

tracer = trace.get_tracer("tests.ray")


class TaskFailed(Exception):
    """Raised in a Ray worker, to check that the caller gets this very type back."""


class Opaque(Exception):
    """An exception whose pickling drops its ``__dict__``, so nothing can ride on it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self.args


def identity(x: Any) -> Any:
    """The smallest task."""
    return x


def record(name: str, gate: str | None = None) -> dict[str, Any]:
    """Record one span in the worker (once ``gate`` exists, if given); report where it ran
    and what it saw."""
    if gate is not None:
        _wait_for(gate)
    with tracer.start_as_current_span(name) as span:
        sc = span.get_span_context()
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "trace_id": sc.trace_id,
            "span_id": sc.span_id,
            "baggage": dict(baggage.get_all()),
            "request_id": REQUEST_ID.get(None),
        }


def seen() -> dict[str, Any]:
    """What of the context a task sees, without recording a span."""
    return {
        "pid": os.getpid(),
        "baggage": dict(baggage.get_all()),
        "request_id": REQUEST_ID.get(None),
        "unregistered": UNREGISTERED.get(),
        "span_valid": trace.get_current_span().get_span_context().is_valid,
    }


def change_context(value: str) -> dict[str, Any]:
    """Set the registered variable and baggage in the worker; report what was there first."""
    before = seen()
    REQUEST_ID.set(value)
    UNREGISTERED.set(value)
    context.attach(baggage.set_baggage("changed", value))  # never detached: must not leak
    return before


def fail(name: str, message: str, gate: str | None = None) -> None:
    """Record a span (once ``gate`` exists, if given), then raise `TaskFailed` from inside it."""
    if gate is not None:
        _wait_for(gate)
    with tracer.start_as_current_span(name):
        raise TaskFailed(message, 42)


def fail_opaquely(name: str) -> None:
    """Record a span, then raise `Opaque`, which carries nothing home."""
    with tracer.start_as_current_span(name):
        raise Opaque("opaque")


def exit_now(name: str) -> None:
    """Record a span, then end the worker process mid-task, as a crash would."""
    with tracer.start_as_current_span(name):
        os._exit(17)


def kill_self(name: str) -> None:
    """Record a span, then SIGKILL the worker process mid-task."""
    with tracer.start_as_current_span(name):
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)


def first_attempt_dies(marker: str, name: str) -> int:
    """Die in the first attempt (no ``marker`` yet); record a span and return in the next."""
    attempt = "dying" if not os.path.exists(marker) else "surviving"
    with tracer.start_as_current_span(f"{name} {attempt}"):
        if attempt == "dying":
            open(marker, "w").close()
            os._exit(17)
    return os.getpid()


def first_attempt_raises(marker: str, name: str) -> int:
    """Raise in the first attempt (no ``marker`` yet); record a span and return in the next."""
    attempt = "raising" if not os.path.exists(marker) else "returning"
    with tracer.start_as_current_span(f"{name} {attempt}"):
        if attempt == "raising":
            open(marker, "w").close()
            raise TaskFailed("first attempt")
    return os.getpid()


def hold(started: str, gate: str) -> bool:
    """Mark that the task started, then block until ``gate`` exists; whether it appeared."""
    open(started, "w").close()
    return _wait_for(gate)


def _wait_for(path: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(path)


def touch(path: str) -> None:
    """Create ``path``: proof that the task ran."""
    open(path, "w").close()


def total(values: list[int], scale: int = 1) -> int:
    """A task taking a value Ray may hand over from an ObjectRef."""
    return sum(values) * scale


def kinds(*args: Any, **kwargs: Any) -> dict[str, str]:
    """The type name of each argument, as the task received it."""
    found = {str(i): type(a).__name__ for i, a in enumerate(args)}
    found.update({key: type(value).__name__ for key, value in kwargs.items()})
    return found


def assigned_resources() -> dict[str, float]:
    """The resources Ray assigned to this task."""
    import ray

    return dict(ray.get_runtime_context().get_assigned_resources())


def span_processors() -> list[str]:
    """The class names of the span processors of this process's tracer provider."""
    active = getattr(trace.get_tracer_provider(), "_active_span_processor", None)
    return [type(p).__name__ for p in getattr(active, "_span_processors", ())]


def read(ref_holder: list[Any]) -> Any:
    """``ray.get`` of an ObjectRef handed over inside a list (Ray leaves nested refs as refs)."""
    import ray

    return ray.get(ref_holder[0])


class Frame:
    """A buffer that pickles out of band (protocol 5), as a NumPy array does."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        if protocol >= 5:
            return Frame, (pickle.PickleBuffer(self.data),)
        return Frame, (bytes(self.data),)


def received(frame: Frame) -> dict[str, Any]:
    """How a frame's buffer arrived: a read-only view (zero-copy, out of band) or a copy."""
    data = frame.data
    return {"type": type(data).__name__, "size": len(data),
            "readonly": memoryview(data).readonly}
