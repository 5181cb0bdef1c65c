"""Tools for finding context bugs: jitter, task lineage, live threads and tasks, a log filter.

* `jitter` sleeps at random, seeded, at propagate's switch points (capture, attach,
  detach, task start and end), to widen the races a test would otherwise rarely hit;
* `track_tasks` records which asyncio task created which, and `task_tree` draws them;
* `live` lists the threads, child processes and asyncio tasks still running, and
  `assert_quiescent` fails when any outlives a baseline;
* `ContextFilter` puts the current trace and span ids on every log record.

``import propagate`` loads it as ``propagate.debug``.
"""

from __future__ import annotations

import logging
import threading
from typing import TextIO

from .. import _otel
from ._jitter import POINTS, Jitter, jitter
from ._lineage import print_task_tree, task_tree, track_tasks
from ._live import (
    Live,
    ProcessInfo,
    Running,
    TaskInfo,
    ThreadInfo,
    assert_quiescent,
    current_task,
    live,
)

__all__ = [
    "Jitter", "jitter", "POINTS",
    "track_tasks", "task_tree", "print_task_tree",
    "live", "assert_quiescent", "Live", "Running", "ThreadInfo", "ProcessInfo", "TaskInfo",
    "ContextFilter", "doctor",
]


def doctor(file: TextIO | None = None) -> None:
    """Like ``python -m propagate doctor``, but from inside this process.

    Call it in your application, where the tracer provider, the propagators, the loop's
    default executor and the registered ContextVars are the real ones, and paste the
    output into a bug report. Prints to ``file`` (default: standard output).
    """
    from ._doctor import main

    main(file)


# -- logging -------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Like `logging.Filter`, but it lets every record through, adding the current context.

    Adds ``trace_id`` (32 hex digits, ``"0" * 32`` outside any span), ``span_id`` (16 hex
    digits), ``thread_name`` and ``task_name`` (the asyncio task's name, ``"-"`` outside
    a task) to each record, as they are in the thread that logs. Put it on the handler
    (or on a ``QueueHandler``, which runs in the logging thread), then format with:

        "%(asctime)s %(levelname)s [%(trace_id)s/%(span_id)s %(thread_name)s] %(message)s"

    It also adds the fields of OpenTelemetry's logging instrumentation, with the values
    that instrumentation gives them, so formats written for it work unchanged:
    ``otelTraceID``, ``otelSpanID`` (``"0"`` outside any span), ``otelTraceSampled`` and
    ``otelServiceName`` (the tracer provider's ``service.name``, else ``""``).

    In propagate's thread and process pools, workers log their submitter's ids.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the ids and names to ``record``; always True: no record is dropped."""
        identity = _otel.current_identity()
        trace_id = None if identity is None else f"{identity[0]:032x}"
        span_id = None if identity is None else f"{identity[1]:016x}"
        record.trace_id = trace_id or "0" * 32
        record.span_id = span_id or "0" * 16
        record.otelTraceID = trace_id or "0"
        record.otelSpanID = span_id or "0"
        record.otelTraceSampled = identity is not None and bool(identity[2] & 1)
        record.otelServiceName = _otel.service_name()
        record.thread_name = threading.current_thread().name
        task = current_task()
        record.task_name = "-" if task is None else task.get_name()
        return True
