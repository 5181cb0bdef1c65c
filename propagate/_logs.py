"""Worker logs home: records a task logs in a worker are handled by the submitter's loggers.

With ``relay_logs=True`` each task carries the submitter's logger levels (`levels`). In
the worker, while the task runs (`Capture`), a logger asks those levels whether a record
is wanted instead of its own (a fresh spawn worker's root logger is at WARNING, so its
own levels would drop INFO), and a record that passes the logger's filters is kept,
with the context it was logged in, instead of going to the worker's handlers: so no
handler of the worker sees it, whether it was inherited through fork or added by a
re-imported ``__main__``. That is `Logger.callHandlers`, the one step every record
takes to reach handlers, and the first at which a logger's own filters have passed.

The records ride home with the task's spans, on its result or exception (`_relay`),
and are handled in the submitting process (`deliver`), in the order they were logged,
before the task's future resolves: each by the logger of its name there, if that
logger is enabled for its level, with the worker's span context, baggage and
registered ContextVars of the moment it was logged current, so that handlers and
filters (`propagate.debug.ContextFilter`, OpenTelemetry's logging handler) see the
worker's trace and span ids. A handler's error is reported as logging reports one,
and never fails the task.
"""

from __future__ import annotations

import contextvars
import logging
import pickle
import sys
import threading
import traceback
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

from . import _context, _private

Levels = tuple[int, Mapping[str, int]]  # logging.disable's level, explicit levels by logger name
Record = bytes  # one record and the context it was logged in, pickled in the worker

PROTOCOL = pickle.HIGHEST_PROTOCOL
_MARK = "propagate.levels"  # a key in the root logger's level cache, cleared with it
_levels: Levels | None = None


# -- in the submitting process ------------------------------------------------------------------


def levels() -> Levels:
    """The submitter's logger levels, as a task carries them: read again when they change.

    ``Logger.setLevel``, ``logging.disable`` and ``dictConfig`` clear every logger's
    level cache; a mark left in the root logger's says the levels read last still hold.
    """
    global _levels
    cache = _private.logger_cache(logging.root)
    if cache is not None and _MARK in cache and _levels is not None:
        return _levels
    if cache is not None:
        cache[_MARK] = True  # first: a change from now on clears it, and is read next time
    manager = logging.root.manager
    explicit = {"root": logging.root.level}
    for name, logger in list(manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            explicit[name] = logger.level
    _levels = (manager.disable, explicit)
    return _levels


def deliver(records: list[Record]) -> None:
    """Handle relayed records here, in order, each in the context it was logged in."""
    for blob in records:
        try:
            state, fields = pickle.loads(blob)
            record = logging.makeLogRecord(state)
        except Exception:
            _report("propagate: a log record relayed from a worker could not be rebuilt")
            continue
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            contextvars.copy_context().run(_handle, logger, record, fields)


def _handle(logger: logging.Logger, record: logging.LogRecord, fields: tuple[Any, ...]) -> None:
    identity, baggage, values = fields
    try:
        state = _context.enter(identity, baggage, values)
    except Exception:  # a ContextVar registered there, not here: the rest still holds
        state = _context.enter(identity, baggage, {})
    try:
        logger.handle(record)
    except Exception:  # a filter's error: logging reports a handler's itself
        _report(f"propagate: a relayed log record of logger {record.name!r} failed in a "
                "filter or handler")
    finally:
        _context.leave(state)


def _report(what: str) -> None:
    """Report an error as ``logging.Handler.handleError`` does: on stderr, if logging does."""
    if logging.raiseExceptions and sys.stderr is not None:
        try:
            sys.stderr.write(f"--- {what}\n")
            traceback.print_exc(file=sys.stderr)
        except OSError:  # stderr gone, as logging gives up
            pass


# -- in the worker -----------------------------------------------------------------------------


class Capture:
    """The records one task logs, while it runs; `close` ends it."""

    __slots__ = ("_effective", "disable", "explicit", "records")

    def __init__(self, sent: Levels) -> None:
        self.disable, self.explicit = sent
        self.records: list[Record] | None = []
        self._effective: dict[str, int] = {}

    def enabled(self, name: str, level: int) -> bool:
        """Whether the submitter's logger ``name`` is enabled for ``level``."""
        if level <= self.disable:
            return False
        effective = self._effective.get(name)
        if effective is None:
            effective = self._effective[name] = self._level_of(name)
        return level >= effective

    def _level_of(self, name: str) -> int:
        explicit = self.explicit
        while name:  # the logger's own level, else its nearest ancestor's, as logging does
            level = explicit.get(name)
            if level is not None:
                return level
            name = name.rpartition(".")[0]
        return explicit.get("root", logging.WARNING)

    def add(self, record: logging.LogRecord) -> bool:
        """Keep ``record``; False once the task has ended (its handlers here take it)."""
        records = self.records
        if records is None:
            return False
        try:
            fields = _context.capture_fields()
        except Exception:  # baggage with no string form: the record still goes, without it
            fields = (None, {}, {})
        records.append(_pickled(record, fields))
        return True

    def close(self) -> list[Record]:
        records, self.records = self.records or [], None
        return records


_capture: ContextVar[Capture | None] = ContextVar("propagate.logs.capture", default=None)
_installed = False
_install_lock = threading.Lock()


def capture(sent: Levels) -> Capture:
    """Capture the records the current Context logs from now on, until `Capture.close`."""
    if not _installed:
        _install()
    found = Capture(sent)
    _capture.set(found)
    return found


def _install() -> None:
    """Make every logger of this worker ask the task's capture first (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        own_enabled = logging.Logger.isEnabledFor
        own_call_handlers = logging.Logger.callHandlers

        def isEnabledFor(self: logging.Logger, level: int) -> bool:
            found = _capture.get()
            if found is None or found.records is None:
                return own_enabled(self, level)
            return found.enabled(self.name, level)

        def callHandlers(self: logging.Logger, record: logging.LogRecord) -> None:
            found = _capture.get()
            if found is None or not found.add(record):
                own_call_handlers(self, record)

        isEnabledFor.__doc__ = own_enabled.__doc__
        callHandlers.__doc__ = own_call_handlers.__doc__
        logging.Logger.isEnabledFor = isEnabledFor  # type: ignore[method-assign]
        logging.Logger.callHandlers = callHandlers  # type: ignore[method-assign]
        _installed = True


_FORMATTER = logging.Formatter()


def _pickled(record: logging.LogRecord, fields: tuple[Any, ...]) -> Record:
    """The record as the submitter rebuilds it (`logging.makeLogRecord`), and its context.

    A traceback cannot be pickled: the exception's is formatted here, into ``exc_text``,
    which formatters print instead of formatting ``exc_info`` again, and the exception
    goes without it. What does not pickle as it is (arguments, an ``extra`` value, the
    exception, a registered ContextVar's value) is formatted here instead, never lost.
    """
    state = dict(record.__dict__)
    exc_info = state.get("exc_info")
    if exc_info:
        if not state.get("exc_text"):
            state["exc_text"] = _FORMATTER.formatException(exc_info)
        state["exc_info"] = (exc_info[0], exc_info[1], None)
    try:
        blob = pickle.dumps((state, fields), PROTOCOL)
        if exc_info:  # an exception that pickles may still not unpickle: check it here
            pickle.loads(blob)
        return blob
    except Exception:
        pass
    state["msg"], state["args"] = _message(record), None
    state["exc_info"] = None
    for key, value in state.items():
        try:
            pickle.dumps(value, PROTOCOL)
        except Exception:
            state[key] = _repr(value)
    try:
        return pickle.dumps((state, fields), PROTOCOL)
    except Exception:  # a registered ContextVar's value: the record goes without them
        return pickle.dumps((state, (*fields[:2], {})), PROTOCOL)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:  # logging's own handlers would report it: say what was there
        return f"{_repr(record.msg)} % {_repr(record.args)} ({type(exc).__name__}: {exc})"


def _repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__qualname__} object>"
