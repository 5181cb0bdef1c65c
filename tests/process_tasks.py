"""Task functions for the process pool tests, importable by spawn and forkserver workers.

Each returns plain values describing what the worker saw, so a test can compare them
with the submitter's context. Kept light: no pytest, and not `tests.helpers` (the SDK
setup), in the workers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from opentelemetry import baggage, context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import propagate

REQUEST_ID: ContextVar[str] = propagate.register(
    ContextVar("tests.process_tasks.request_id", default="unset"))
UNREGISTERED: ContextVar[str] = ContextVar("tests.process_tasks.unregistered", default="default")
WAIT_SECONDS = 60.0

_initialized: str | None = None


class TaskError(Exception):
    """The user's own exception type, raised in a worker."""


class TblibError(Exception):
    """An exception the worker pickles with tblib, as it would after ``import distributed``."""


def observe() -> dict[str, Any]:
    """What of the submitter's context the worker sees."""
    sc = trace.get_current_span().get_span_context()
    return {
        "pid": os.getpid(),
        "trace_id": sc.trace_id,
        "span_id": sc.span_id,
        "is_remote": sc.is_remote,
        "baggage": dict(baggage.get_all()),
        "request_id": REQUEST_ID.get(),
        "unregistered": UNREGISTERED.get(),
        "thread_id": threading.get_native_id(),
        "thread_name": threading.current_thread().name,
    }


def digest(data: object) -> dict[str, Any]:
    """What `observe` sees, and a digest of ``data`` (pickled): did it arrive whole?"""
    import hashlib
    import pickle
    return {**observe(), "digest": hashlib.sha256(pickle.dumps(data, 4)).hexdigest()}


def record_spans(*names: str) -> dict[str, Any]:
    """Start nested spans, one per name, and return their ids as the worker saw them."""
    tracer = trace.get_tracer("tests.process_tasks")
    spans: list[tuple[str, int, int, int | None]] = []

    def nest(rest: tuple[str, ...]) -> None:
        if not rest:
            return
        with tracer.start_as_current_span(rest[0]) as span:
            span.set_attribute("task.depth", len(spans))
            sc = span.get_span_context()
            parent = getattr(span, "parent", None)  # None on a non-recording span
            parent_id = None if parent is None else parent.span_id
            spans.append((rest[0], sc.trace_id, sc.span_id, parent_id))
            nest(rest[1:])

    nest(names)
    return {"pid": os.getpid(), "spans": spans}


def exported_here(name: str) -> int:
    """Record a span, and count how many of that name this worker exported itself.

    Only a forked worker has the test session's exporter (a copy of it, inherited).
    """
    with trace.get_tracer("tests.process_tasks").start_as_current_span(name):
        pass
    helpers = sys.modules.get("tests.helpers")
    if helpers is None:
        return 0
    return sum(1 for s in helpers.EXPORTER.get_finished_spans() if s.name == name)


def fail_after_span(name: str) -> None:
    """Record a span, then raise the user's own exception."""
    with trace.get_tracer("tests.process_tasks").start_as_current_span(name):
        pass
    raise TaskError("boom", 42)


def fail_pickled_by_tblib(name: str) -> None:
    """Like `fail_after_span`, in a worker where tblib pickles the exception."""
    from tblib import pickling_support

    pickling_support.install(TblibError)
    with trace.get_tracer("tests.process_tasks").start_as_current_span(name):
        pass
    raise TblibError("boom", 42)


def leak() -> dict[str, Any]:
    """Set everything a task could leak, and reset nothing."""
    REQUEST_ID.set("leaked")
    UNREGISTERED.set("leaked")
    stray = NonRecordingSpan(SpanContext(0x1234, 0x5678, is_remote=False,
                                         trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    ctx = baggage.set_baggage("leaked", "yes", trace.set_span_in_context(stray))
    context.attach(ctx)  # never detached, on purpose
    return observe()


def wait_for(path: str, result: Any = None) -> Any:
    """Keep the worker busy until ``path`` exists (bounded), then return ``result``."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return result


def touch(path: str, *payload: object) -> int:
    """Leave a mark that this task ran (``payload`` only has to cross)."""
    with open(path, "w"):
        pass
    return os.getpid()


def square(x: int) -> int:
    return x * x


def pid() -> int:
    return os.getpid()


def exit_now() -> None:
    """A worker that dies mid-task without a word."""
    os._exit(1)


def kill_self() -> None:
    """A worker killed mid-task by the kernel."""
    os.kill(os.getpid(), signal.SIGKILL)


def initialize(value: str) -> None:
    global _initialized
    _initialized = value


def initialized() -> tuple[str | None, str]:
    return _initialized, REQUEST_ID.get()


def numbers() -> Iterator[int]:
    """A generator: an argument nothing can pickle."""
    yield 1



def observe_then_leak(_: object) -> dict[str, Any]:
    """For map(): what this item sees, then leave junk for the next item of the chunk."""
    seen = observe()
    leak()
    return seen


def tagged(i: int) -> str:
    """For map(): the request id this item sees, with the item."""
    return f"{REQUEST_ID.get()}:{i}"


# -- fidelity to the stdlib's pickling (issue: process pools as faithful as the stdlib's) ----

tracer = trace.get_tracer(__name__)  # the module-level idiom, used by lambdas in the tests
CACHED = TaskError("cached")  # one exception object, raised by every task that raises it


def send_on(conn: Any, message: object) -> int:
    """Write to a multiprocessing ``Connection`` the submitter passed as an argument."""
    conn.send(message)
    return os.getpid()


def send_on_socket(sock: Any, data: bytes) -> int:
    sock.sendall(data)
    return len(data)


class Marked:
    """A value multiprocessing sends through a reducer registered for it (see the tests)."""

    def __init__(self, how: str) -> None:
        self.how = how


def how_marked(value: Marked) -> str:
    return value.how


def raise_cached(name: str) -> None:
    """Record a span, then raise the module's one cached exception object."""
    with tracer.start_as_current_span(name):
        pass
    raise CACHED


def return_cached(name: str) -> TaskError:
    """Record a span, then return (not raise) the cached exception object as a value."""
    with tracer.start_as_current_span(name):
        pass
    return CACHED


def span_then_return(name: str, value: object) -> object:
    with tracer.start_as_current_span(name):
        pass
    return value


class Unpicklable:
    """A value that cannot be pickled: its reducer refuses, with the pickler's own error."""

    def __reduce__(self) -> Any:
        import pickle
        raise pickle.PicklingError("Unpicklable refuses to be pickled")


class FailsToLoad:
    """Pickles, but unpickling it raises: where it is rebuilt, it cannot be."""

    def __reduce__(self) -> Any:
        return (_refuse_load, ())


def _refuse_load() -> None:
    raise ValueError("FailsToLoad cannot be rebuilt")


class SpanThenUnpicklableError(Exception):
    """An exception carrying what cannot be pickled."""

    def __init__(self) -> None:
        super().__init__("carries a lock")
        self.lock = threading.Lock()


def raise_unpicklable(name: str) -> None:
    with tracer.start_as_current_span(name):
        pass
    raise SpanThenUnpicklableError()


def baggage_value(key: str) -> object:
    return baggage.get_baggage(key)


def log_then_die(path: str) -> None:
    """Log from the worker until the moment it is killed (by itself, mid-record)."""
    import logging
    log = logging.getLogger("tests.process_tasks")
    with tracer.start_as_current_span("dying"):
        for i in range(100):
            log.warning("record %d", i)
            if i == 50:
                os.kill(os.getpid(), signal.SIGKILL)


def sleep_then(name: str, seconds: float) -> str:
    with tracer.start_as_current_span(name):
        time.sleep(seconds)
    return name


def use_opaque_provider() -> None:
    """Initializer: a provider whose active span processor the relay cannot reach into."""
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Opaque(SpanProcessor):
        """Some other active span processor: no _span_processors, no _lock."""

    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # not under fork
        trace.set_tracer_provider(TracerProvider(active_span_processor=Opaque(),
                                                 shutdown_on_exit=False))


def span_then_make(name: str, make: str) -> object:
    """Record a span, then return a value made here: ``"lock"`` cannot be pickled,
    ``"fails to load"`` cannot be unpickled where it arrives."""
    with tracer.start_as_current_span(name):
        pass
    return threading.Lock() if make == "lock" else FailsToLoad()


def raise_chained(name: str) -> None:
    """Record a span, then raise an exception chained to another (``raise ... from ...``)."""
    with tracer.start_as_current_span(name):
        pass
    try:
        raise ValueError("the cause")
    except ValueError as cause:
        raise TaskError("chained") from cause


def templates() -> int:
    """How many contexts this worker has made a template of (`_context.task_context`)."""
    from propagate import _context
    return len(_context._templates)


def append_to_request(item: str) -> Any:
    """Change the registered value in place (a list), and return it."""
    value = REQUEST_ID.get()
    value.append(item)  # type: ignore[attr-defined]
    return value


def mark_worker(value: str) -> None:
    """An initializer that sets a variable in the worker's own context, for good."""
    UNREGISTERED.set(value)


def raise_unshareable(name: str) -> None:
    """Raise an exception that cannot be pickled, having recorded no span."""
    raise SpanThenUnpicklableError()


def detached_depth() -> int:
    """How many of propagate's detached runs this task is inside: one, unless bound twice."""
    frame = sys._getframe()
    depth = 0
    while frame is not None:
        depth += frame.f_code.co_name == "run_detached" and \
            frame.f_globals.get("__name__") == "propagate._executor"
        frame = frame.f_back
    return depth
