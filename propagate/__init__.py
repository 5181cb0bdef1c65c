"""Carry the caller's context where Python drops it.

Every ContextVar, and with them the OpenTelemetry trace context and baggage, crosses
into thread pools, raw threads, process pools, ``run_in_executor``, DNS lookups and the
executors of distributed engines; span scopes are only exited where they were entered.
"""

import importlib
import sys
import typing

from ._errors import (
    ContextSerializationError,
    CrossThreadExitWarning,
    PropagateError,
    TaskSerializationError,
)
from ._version import __version__ as __version__

if typing.TYPE_CHECKING:
    from . import debug, dns
    from ._asyncio import install, run_in_executor, to_thread
    from ._context import DetachedContext, capture, register
    from ._executor import wrap_executor
    from ._instrument import instrument, uninstrument
    from ._process import ProcessPoolExecutor
    from ._span import span, trace
    from ._thread import Thread, ThreadPoolExecutor, Timer, wrap

    if sys.version_info >= (3, 14):
        from ._interpreter import InterpreterPoolExecutor

# Every name is imported where it is defined on first use (PEP 562), so `import propagate`
# (and the pytest plugin, which every pytest run in this environment loads) costs nothing
# until something is used, and then only what that needs: the core (threads, capture,
# spans, the wire) loads OpenTelemetry's API; asyncio, multiprocessing, sockets,
# cloudpickle and the debug tools load with the names that need them.
_LAZY: dict[str, str | None] = {
    "ThreadPoolExecutor": "._thread", "Thread": "._thread", "Timer": "._thread",
    "wrap": "._thread",
    "wrap_executor": "._executor",
    "capture": "._context", "DetachedContext": "._context", "register": "._context",
    "span": "._span", "trace": "._span",
    "to_thread": "._asyncio", "run_in_executor": "._asyncio", "install": "._asyncio",
    "ProcessPoolExecutor": "._process",
    "instrument": "._instrument", "uninstrument": "._instrument",
    "debug": None, "dns": None,  # submodules
}
if sys.version_info >= (3, 14):
    _LAZY["InterpreterPoolExecutor"] = "._interpreter"


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _LAZY[name]
    module = importlib.import_module(f".{name}" if where is None else where, __name__)
    found = module if where is None else getattr(module, name)
    globals()[name] = found
    return found


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
    # the stdlib's own pools and threads, patched for the whole process
    "instrument",
    "uninstrument",
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
