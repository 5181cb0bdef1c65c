"""Task functions only the Ray tests use, importable by name in Ray's worker processes
(the shared ones are in `tests.engine_tasks`). Ray's workers start in the driver's working
directory, with it on ``sys.path``, so they import these modules by name.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from typing import Any

from tests.engine_tasks import TaskFailed, tracer, wait_for


class Opaque(Exception):
    """An exception whose pickling drops its ``__dict__``, so nothing can ride on it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), self.args


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
    return wait_for(gate)


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
