"""propagate._wire: the envelope a task crosses in, and the checks made before it is sent.

Unit level, but for one stdlib pool standing in for a worker of another release: the
process pool tests (test_process.py) send tasks through real workers.
"""

from __future__ import annotations

import concurrent.futures as cf
import pickle
import sys
import threading
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.reduction import ForkingPickler
from typing import Any

import pytest
from opentelemetry import trace

import propagate
from propagate import _wire
from propagate._executor import Options, bind_detached, run_detached
from tests import process_tasks as pt
from tests.helpers import setting, with_baggage

TIMEOUT = 60  # seconds: only bounds a hang of the one real worker


def envelope(fn: Callable[..., Any], *args: Any, values: dict[str, object] | None = None,
             **kwargs: Any) -> tuple[Any, ...]:
    return _wire.envelope(fn, args, kwargs, (None, 0, False, True, None),
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
    """API: the shortcut past the trial says yes only where every pickler surely succeeds."""
    assert _wire.plainly_sendable(task) is plain
    if plain:
        pickle.loads(ForkingPickler.dumps(task))


def test_trial_runs_no_reducer_with_effects() -> None:
    """API, I9: the trial must not run reducers that duplicate descriptors or that users
    registered: a thrown-away trial would leak a descriptor or run a user's reducer twice."""
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
    """I7: a bound method of an unpicklable object fails the trial, as it fails the real send."""
    lock = threading.Lock()
    assert isinstance(_wire._sendable(envelope(pt.square, lock.acquire)), TypeError)


def test_lazy_falls_back_to_cloudpickle_for_what_the_stdlib_cannot_send() -> None:
    """I1: what multiprocessing's pickler cannot send (a closure) crosses by cloudpickle,
    with the rest of its envelope unchanged."""
    captured = 41
    task = envelope(lambda: captured + 1)
    fields = _wire.opened(pickle.loads(ForkingPickler.dumps(_wire.Lazy(task))))
    assert fields[0]() == 42
    assert fields[1:] == task[3:]


def test_envelope_from_another_release_is_refused_naming_both() -> None:
    """I7: an envelope of another wire format, or 0.1's bare blob, is refused, naming both
    releases."""
    with pytest.raises(RuntimeError, match=r"propagate 9\.9\.9.*propagate " +
                       propagate.__version__.replace(".", r"\.")):
        _wire.opened((_wire.WIRE + 1, "9.9.9", b""))
    with pytest.raises(RuntimeError, match=r"older propagate \(0\.1, wire format 1\)"):
        _wire.opened(b"a blob from 0.1")


def test_tracers_and_meters_pickle_by_reference() -> None:
    """I6: a tracer or meter sent by value resolves, on the other side, to that side's own
    provider's (where the relay collects), with the same instrumentation scope."""
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
    """I1: for a receiver that cannot run ``__main__`` (a subinterpreter under ``python -c``):
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


# -- the envelope as a pending task holds it, and its version ------------------------------


def test_pending_tasks_of_one_context_share_its_fields(tracer: trace.Tracer) -> None:
    """I9: a pending task holds one tuple more than the stdlib's: its envelope, spread as the
    call's arguments. What it shares with the other tasks of its context (the empty kwargs,
    the task fields, the sealed context) is one object for all."""
    options = Options.checked()
    with tracer.start_as_current_span("submitter"), with_baggage(user="alice"):
        calls = [bind_detached(pt.square, (i,), {}, options) for i in range(3)]
        with setting(pt.REQUEST_ID, "req-1"):
            valued = [bind_detached(pt.square, (i,), {}, options) for i in range(2)]
    first = calls[0][1]
    assert [call for call, _, _ in calls] == [run_detached] * 3
    assert first[:2] == (_wire.WIRE, propagate.__version__) and first[3] == (0,)
    for _, other, _ in calls[1:]:
        assert all(other[i] is first[i] for i in range(4, 7)), other
    assert type(first[6]) is bytes and _wire.context_fields(first[6])[2] == {}
    assert _wire.context_fields(valued[0][1][6])[2] == {pt.REQUEST_ID.name: "req-1"}
    assert run_detached(*pickle.loads(ForkingPickler.dumps(calls[2][1]))) == 4  # spread: runs


def test_task_from_another_release_fails_naming_both_versions(mp_context: BaseContext) -> None:
    """I7: a worker on another release of propagate fails the task at once, naming both."""
    forged = (_wire.WIRE + 1, "9.9.9", b"whatever comes next")
    with cf.ProcessPoolExecutor(1, mp_context=mp_context) as stdlib:
        error = stdlib.submit(run_detached, forged).exception(timeout=TIMEOUT)
        old = stdlib.submit(run_detached, b"a 0.1 blob").exception(timeout=TIMEOUT)
    assert isinstance(error, RuntimeError)
    assert "9.9.9" in str(error) and propagate.__version__ in str(error)
    assert isinstance(old, RuntimeError) and "0.1" in str(old)
