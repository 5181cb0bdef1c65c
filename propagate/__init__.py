"""Carry the caller's context where Python drops it.

Every ContextVar, and with them the OpenTelemetry trace context and baggage, crosses
into thread pools, raw threads, process pools, ``run_in_executor``, DNS lookups and the
executors of distributed engines; span scopes are only exited where they were entered.
"""

import sys

from . import debug, dns
from ._asyncio import install, run_in_executor, to_thread
from ._context import DetachedContext, capture, register
from ._errors import (
    ContextSerializationError,
    CrossThreadExitWarning,
    PropagateError,
    TaskSerializationError,
)
from ._executor import wrap_executor
from ._process import ProcessPoolExecutor
from ._span import span, trace
from ._thread import Thread, ThreadPoolExecutor, Timer, wrap
from ._version import __version__ as __version__

if sys.version_info >= (3, 14):
    from ._interpreter import InterpreterPoolExecutor


__all__ = [
    # threads: snapshots of the whole context
    "ThreadPoolExecutor",
    "Thread",
    "Timer",
    "wrap",
    # processes and any pickling executor: detached contexts
    "ProcessPoolExecutor",
    "wrap_executor",
    "capture",
    "DetachedContext",
    "register",
    # asyncio
    "to_thread",
    "run_in_executor",
    "install",
    # span scopes that only exit where they entered
    "span",
    "trace",
    # submodules: DNS lookups in a pool; tools for finding context bugs
    "dns",
    "debug",
    # errors and warnings
    "PropagateError",
    "ContextSerializationError",
    "TaskSerializationError",
    "CrossThreadExitWarning",
]
if sys.version_info >= (3, 14):  # subinterpreters, each with its own detached context
    __all__ += ["InterpreterPoolExecutor"]
