"""propagate._wire: the envelope a task crosses in, and the checks made before it is sent.

Unit level: the process pool tests (test_process.py) send tasks through real workers.
"""

from __future__ import annotations

import pickle
import sys
import threading
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler
from typing import Any

import pytest

import propagate
from propagate import _wire
from tests import process_tasks as pt


def envelope(fn: Callable[..., Any], *args: Any, values: dict[str, object] | None = None,
             **kwargs: Any) -> tuple[Any, ...]:
    return _wire.envelope(fn, args, kwargs, (None, 0, False, True),
                          _wire.context(None, {}, values or {}, None))


def local_function() -> Callable[[], None]:
    def inner() -> None:
        return None
    return inner


@pytest.mark.parametrize(("task", "plain"), [
    (envelope(pt.square, 3), True),
    (envelope(pt.touch, "path", b"x" * 10_000, (1, 2.5, None), key={"a": [1, "b"]}), True),
    (envelope(pt.square, values={"tests.request_id": "r-1"}), True),
    (envelope(pt.square, pt.square), True),  # a function found by its name, as an argument
    (envelope(lambda: None), False),
    (envelope(local_function()), False),
    (envelope(pt.square, threading.Lock()), False),
    (envelope(pt.square, pt.Marked("x")), False),  # not plain data: the trial decides
    (envelope(pt.square, [[i] for i in range(100)]), False),  # too many containers to walk
    (envelope(pt.square, list(range(1000))), False),  # too many items: the trial walks in C
    (envelope(pt.square, key={"k": [1, {"deep": (2, "x")}]}), True),
], ids=["function", "plain-data", "values", "function-argument", "lambda", "local",
        "lock", "object", "many-containers", "many-items", "nested"])
def test_plainly_sendable_is_a_shortcut_never_a_guess(task: tuple[Any, ...], plain: bool) -> None:
    """The shortcut past the trial says yes only where every pickler surely succeeds."""
    assert _wire.plainly_sendable(task) is plain
    if plain:
        pickle.loads(ForkingPickler.dumps(task))


def test_trial_runs_no_reducer_with_effects() -> None:
    """The trial must not run reducers that duplicate descriptors or that users registered:
    a thrown-away trial would leak a descriptor or run a user's reducer twice."""
    calls = []

    def reduce_marked(value: pt.Marked) -> tuple[Any, ...]:
        calls.append(value.how)
        return pt.Marked, (value.how,)

    ForkingPickler.register(pt.Marked, reduce_marked)
    try:
        assert _wire._sendable(envelope(pt.how_marked, pt.Marked("trial"))) is None
        assert calls == []
        ForkingPickler.dumps(_wire.Lazy(envelope(pt.how_marked, pt.Marked("sent"))))
        assert calls == ["sent"]  # the real send runs it, once
    finally:
        ForkingPickler._extra_reducers.pop(pt.Marked, None)  # type: ignore[attr-defined]


def test_trial_sees_through_multiprocessings_pure_reducers() -> None:
    """A bound method of an unpicklable object fails the trial, as it fails the real send."""
    lock = threading.Lock()
    assert isinstance(_wire._sendable(envelope(pt.square, lock.acquire)), TypeError)


def test_lazy_falls_back_to_cloudpickle_for_what_the_stdlib_cannot_send() -> None:
    captured = 41
    task = envelope(lambda: captured + 1)
    fields = _wire.opened(pickle.loads(ForkingPickler.dumps(_wire.Lazy(task))))
    assert fields[0]() == 42
    assert fields[1:] == task[3:]


def test_envelope_from_another_release_is_refused_naming_both() -> None:
    with pytest.raises(RuntimeError, match=r"propagate 9\.9\.9.*propagate " +
                       propagate.__version__.replace(".", r"\.")):
        _wire.opened((_wire.WIRE + 1, "9.9.9", b""))
    with pytest.raises(RuntimeError, match=r"older propagate \(0\.1, wire format 1\)"):
        _wire.opened(b"a blob from 0.1")


def test_tracers_and_meters_pickle_by_reference() -> None:
    """A tracer or meter sent by value resolves, on the other side, to that side's own
    provider's, with the same instrumentation scope."""
    from opentelemetry import metrics, trace

    tracer = trace.get_tracer("tests.wire", "1.0", schema_url="https://example.com/s")
    meter = metrics.get_meter("tests.wire.meter", "2.0")
    back_tracer, back_meter = pickle.loads(_wire._cloudpickle((tracer, meter)))
    with back_tracer.start_as_current_span("sent") as span:  # the session's SDK tracer
        scope = span.instrumentation_scope  # type: ignore[attr-defined]
    assert (scope.name, scope.version, scope.schema_url) == (
        "tests.wire", "1.0", "https://example.com/s")
    assert (back_meter.name, back_meter.version) == ("tests.wire.meter", "2.0")
    with pytest.raises(TypeError):  # not by reference, a tracer cannot be pickled at all
        pickle.dumps(tracer)


def test_plainly_sendable_without_main_refuses_only_main() -> None:
    """For a receiver that cannot run ``__main__`` (a subinterpreter under ``python -c``):
    plain data and module functions still pass; a ``__main__`` function, anywhere, does not."""
    def from_main() -> None:
        return None

    from_main.__module__, from_main.__qualname__ = "__main__", "from_main"
    sys.modules["__main__"].from_main = from_main  # type: ignore[attr-defined]
    try:
        assert _wire.plainly_sendable(envelope(pt.square, 3, [1, "a"]), main=False)
        assert _wire.plainly_sendable(envelope(from_main), main=True)
        assert not _wire.plainly_sendable(envelope(from_main), main=False)
        assert not _wire.plainly_sendable(envelope(pt.square, (from_main,)), main=False)
    finally:
        del sys.modules["__main__"].from_main  # type: ignore[attr-defined]
