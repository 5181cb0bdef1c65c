"""Tasks that log, for tests/test_logs.py: imported by worker processes and subinterpreters.

Light on purpose (no tests.helpers): a spawned worker imports only this.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace

log = logging.getLogger("tests.log_tasks")
tracer = trace.get_tracer("tests.log_tasks")


def log_in_span(name: str, *messages: str) -> dict[str, Any]:
    """Log ``messages`` at INFO inside a span ``name``; say which span and process that was."""
    with tracer.start_as_current_span(name) as span:
        for message in messages:
            log.info(message)
        ids = span.get_span_context()
    return {"span_id": ids.span_id, "trace_id": ids.trace_id, "pid": os.getpid()}


def log_levels(logger: str) -> int:
    """Log one record at each level to ``logger``; return the worker's own effective level."""
    target = logging.getLogger(logger)
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        target.log(level, "at %s", logging.getLevelName(level))
    return target.getEffectiveLevel()


class Opaque:
    """An argument no pickler can send."""

    def __reduce__(self) -> Any:
        raise TypeError("an Opaque cannot be pickled")

    def __repr__(self) -> str:
        return "<Opaque>"


def log_unpicklable() -> None:
    log.warning("holding %r", Opaque())


def log_then_fail(message: str) -> None:
    log.error(message)
    raise ValueError(message)


def log_exception() -> str:
    try:
        raise KeyError("missing")
    except KeyError:
        log.exception("lookup failed")
    return "handled"


def add_file_handler(path: str) -> None:
    """A worker's own handler on the task logger, as a worker's ``__main__`` may add one."""
    handler = logging.FileHandler(path)
    logging.getLogger("tests.log_tasks").addHandler(handler)


def handlers_on(name: str) -> int:
    """How many handlers the worker's logger ``name`` has (inherited through fork, or added)."""
    return len(logging.getLogger(name).handlers)


def log_with_value(var_name: str, value: str) -> None:
    """Log, set the registered ContextVar ``var_name`` to ``value``, log again."""
    from propagate import _context

    log.info("before")
    _context.lookup(var_name).set(value)
    log.info("after")
