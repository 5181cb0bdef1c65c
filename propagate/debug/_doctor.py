"""``python -m propagate doctor``: what a bug report needs, in one paste."""

from __future__ import annotations

import asyncio
import importlib.metadata
import multiprocessing
import platform
import sys
import sysconfig
from typing import TextIO

from .. import _private


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> list[tuple[str, str]]:
    """(label, value) pairs describing this interpreter and propagate's setting in it."""
    from opentelemetry import propagate as otel_propagate
    from opentelemetry import trace

    import propagate

    from .. import _context

    gil = getattr(sys, "_is_gil_enabled", None)
    inherit = getattr(sys.flags, "thread_inherit_context", None)
    provider = trace.get_tracer_provider()
    propagator = otel_propagate.get_global_textmap()
    fields = sorted(propagator.fields)
    return [
        ("python", f"{platform.python_implementation()} {sys.version.split()[0]} ({sys.platform})"),
        ("free-threaded build", "yes" if sysconfig.get_config_var("Py_GIL_DISABLED") else "no"),
        ("GIL enabled", "n/a" if gil is None else str(gil())),
        ("thread_inherit_context flag", "n/a (before 3.14)" if inherit is None else str(inherit)),
        ("default start method", str(multiprocessing.get_start_method(allow_none=True)
                                     or multiprocessing.get_context().get_start_method())),
        ("propagate", propagate.__version__),
        ("opentelemetry-api", _version("opentelemetry-api")),
        ("opentelemetry-sdk", _version("opentelemetry-sdk")),
        ("cloudpickle", _version("cloudpickle")),
        ("tracer provider", f"{type(provider).__module__}.{type(provider).__qualname__}"),
        ("propagators", f"{type(propagator).__qualname__} (fields: {', '.join(fields)})"),
        ("relay available", "yes" if _relay_available() else
         "no (needs opentelemetry-sdk's TracerProvider as the global provider)"),
        ("loop default executor propagates", _loop_status()),
        ("registered ContextVars", ", ".join(sorted(_context.registered())) or "none"),
    ]


def _relay_available() -> bool:
    try:
        from .. import _relay
    except ImportError:
        return False
    return _relay.enabled()


def _loop_status() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "no running loop here (call propagate.install() inside your loop)"
    from .._thread import ThreadPoolExecutor

    return "yes" if isinstance(_private.default_executor(loop),
                               ThreadPoolExecutor) else "no"


def main(file: TextIO | None = None) -> int:
    rows = report()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}", file=file or sys.stdout)
    return 0
