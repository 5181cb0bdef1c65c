"""joblib: backends that carry the caller's context to joblib's workers.

`register` adds two backends to joblib, by name:

* ``propagate-loky``: joblib's ``loky`` backend (worker processes), whose tasks carry a
  detached context, as `propagate.ProcessPoolExecutor`'s do, and whose workers' spans
  come home through the relay;
* ``propagate-threading``: joblib's ``threading`` backend, whose tasks run in a snapshot
  of the caller's context, as `propagate.ThreadPoolExecutor`'s do.

The context is captured once per ``Parallel`` call, when joblib starts it (the backend's
``start_call``, on the caller's thread): joblib dispatches all but the first batches from
its callback threads, whose context is not the caller's. A batch is wrapped, not pickled
here, so loky pickles it exactly as for its own backend (joblib's memmapping reducers
apply), and each item of a batch runs in its own copy of the context, as the items of a
``ProcessPoolExecutor.map`` chunk do. Importing this module teaches loky's pickler (here
and in the workers, which import it to run a batch) to send registered ContextVars by
name.

joblib's backend interface is private and has changed between releases (``apply_async``
became ``submit`` in 1.5): this module supports joblib 1.3 to 1.6, and refuses to import
with any other release.
"""

from __future__ import annotations

import contextvars
import functools
import re
from contextvars import ContextVar
from typing import Any

import joblib

from . import _context, _executor, _wire
from ._errors import ContextSerializationError

__all__ = ["register"]

_SUPPORTED = ((1, 3), (1, 6))  # the joblib releases this module is tested with, first and last


def _check_version(version: str) -> None:
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or not _SUPPORTED[0] <= (int(found[1]), int(found[2])) <= _SUPPORTED[1]:
        raise ImportError(
            f"propagate.joblib supports joblib 1.3 to 1.6, and this is joblib {version}: "
            "install a supported release (pip install 'joblib>=1.3,<1.7')")


_check_version(joblib.__version__)

# E402: imported only once the release is known, since another may not have them
from joblib._parallel_backends import LokyBackend, ThreadingBackend  # noqa: E402
from joblib.externals.loky.backend import reduction  # noqa: E402


def register() -> list[str]:
    """Register propagate's joblib backends, and return their names.

    ``propagate-loky`` is joblib's ``loky`` backend, but each task carries the current
    span's trace identity (spans the task starts are its children), the baggage, and the
    values of ContextVars registered with `propagate.register`: unregistered ContextVars
    keep the worker's own values. With opentelemetry-sdk's tracer provider installed
    here, the spans a worker records come back to it, exactly once, before joblib hands
    back the batch's results (or its exception).

    ``propagate-threading`` is joblib's ``threading`` backend, but each task runs in a
    snapshot of the caller's context: every ContextVar crosses.

    Either way the context is the caller's as it was when the ``Parallel`` call started,
    each item of a batch gets its own copy of it, changes made in a task never flow back,
    and a ``Parallel`` call nested in a task runs on ``propagate-threading``. A call that
    requires shared memory (``require="sharedmem"``) gets joblib's own ``threading``
    backend, which carries nothing: give it ``backend="propagate-threading"``. Calling
    ``register`` again changes nothing::

        propagate.joblib.register()
        with joblib.parallel_config(backend="propagate-loky", n_jobs=4):
            results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)
    """
    joblib.register_parallel_backend("propagate-loky", _Loky)
    joblib.register_parallel_backend("propagate-threading", _Threading)
    return ["propagate-loky", "propagate-threading"]


class _Loky(LokyBackend):  # type: ignore[misc]  # joblib has no types
    """Like joblib's ``loky`` backend, but batches carry a detached context and relay spans."""

    _context: Any = None  # from start_call to stop_call: the call's context, or why it cannot cross

    def start_call(self) -> None:
        super().start_call()
        self._context = _detached()

    def stop_call(self) -> None:
        self._context = None
        super().stop_call()

    def submit(self, func: Any, callback: Any = None) -> Any:
        """As joblib's loky backend submits a batch, but the batch in its envelope.

        Spread as ``run_detached``'s arguments rather than in a ``partial``: loky pickles
        every batch with cloudpickle, where each function is a lookup by name.
        """
        future = _submitted(self._workers.submit, _executor.run_detached, *self._envelope(func))
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # what joblib 1.3 and 1.4 call

    def get_nested_backend(self) -> tuple[Any, Any]:
        return _nested(super().get_nested_backend())

    def _envelope(self, batch: Any) -> tuple[Any, ...]:
        """``batch`` as a task for `_executor.run_detached`, with the call's context."""
        context = self._context
        if context is None:  # dispatched after the call ended, as joblib aborts it
            context = _detached()
        if isinstance(context, ContextSerializationError):
            raise context  # here, in the dispatch, joblib ends the call cleanly
        return _wire.envelope(_run_batch, (batch,), _executor._NO_KWARGS,
                              _executor._NO_SPAN_SENT_BY_OTHERS, context)


class _Threading(ThreadingBackend):  # type: ignore[misc]  # joblib has no types
    """Like joblib's ``threading`` backend, but each item runs in a copy of a snapshot."""

    _snapshot: contextvars.Context | None = None  # from start_call to stop_call

    def start_call(self) -> None:
        super().start_call()
        self._snapshot = _executor.snapshot()

    def stop_call(self) -> None:
        self._snapshot = None
        super().stop_call()

    def submit(self, func: Any, callback: Any = None) -> Any:
        return _submitted(super().submit, self._bound(func), callback)

    def apply_async(self, func: Any, callback: Any = None) -> Any:  # what joblib 1.3, 1.4 call
        return _submitted(super().apply_async, self._bound(func), callback)

    def get_nested_backend(self) -> tuple[Any, Any]:
        return _nested(super().get_nested_backend())

    def _bound(self, batch: Any) -> functools.partial[Any]:
        snapshot = self._snapshot
        if snapshot is None:  # dispatched after the call ended, as joblib aborts it
            snapshot = _executor.snapshot()
        return functools.partial(_run_batch, batch, snapshot)


def _detached() -> bytes | tuple[Any, ...] | ContextSerializationError:
    """The current context as a task's context field (`_wire.context`), or why it cannot cross.

    The error is raised at the first dispatch, not here in ``start_call``: joblib cleans
    up after an error in a dispatch, and would leave the ``Parallel`` running after one here.
    """
    try:
        identity, baggage, values = _context.capture_fields()
        if values:
            _wire.check_values(values)
    except ContextSerializationError as exc:
        return exc
    return _wire.context(identity, baggage, values, _executor._relay_origin())


def _submitted(submit: Any, /, *args: Any) -> Any:
    """joblib's own submit, from an empty Context where threads inherit the starter's.

    Both backends start their pool's threads (loky's manager, the thread pool's workers
    and result handler) in a submit: under Python 3.14's ``thread_inherit_context`` they
    would keep the caller's context for the pool's life.
    """
    if _executor.INHERITS:
        return _executor.submit_from_empty_context(submit, *args)
    return submit(*args)


def _nested(nested: tuple[Any, Any]) -> tuple[Any, Any]:
    """The backend joblib gives a ``Parallel`` call inside a task: ours, where it is threads."""
    backend, n_jobs = nested
    if type(backend) is ThreadingBackend:
        backend = _Threading(nesting_level=backend.nesting_level)
    return backend, n_jobs


def _run_batch(batch: Any, snapshot: contextvars.Context | None = None) -> Any:
    """Run a joblib batch, each item in its own copy of ``snapshot`` (else of the current context).

    The batch itself still runs the items, so joblib's setting for nested calls applies.
    In a worker process (no snapshot), `_executor.run_detached` made the current context
    for this task and settles it: a batch of one item runs in it as it is, and the items
    of a bigger one each in a copy, as a ``ProcessPoolExecutor.map`` chunk's do. On a
    thread each item is settled in its copy, since no pool future ends it.
    """
    if snapshot is None:
        if len(batch.items) > 1:
            batch.items = [(contextvars.copy_context().run, (fn, *args), kwargs)
                           for fn, args, kwargs in batch.items]
        return batch()
    batch.items = [(snapshot.copy().run, (_executor.settled, fn, *args), kwargs)
                   for fn, args, kwargs in batch.items]
    return batch()


# loky's pickler sends a registered ContextVar by name, as propagate's own does
reduction.register(ContextVar, _wire.reduce_contextvar)
