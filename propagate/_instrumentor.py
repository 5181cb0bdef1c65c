"""The ``opentelemetry_instrumentor`` entry point ``propagate``: ``opentelemetry-instrument``
turns on `propagate.instrument`. Imported only by that entry point (it needs
opentelemetry-instrumentation); ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS=propagate`` skips it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

# mypy (python_version 3.10) does not see the class in that module: Any to it
from opentelemetry.instrumentation.instrumentor import (  # type: ignore[attr-defined,unused-ignore]
    BaseInstrumentor,
)

from ._instrument import instrument, uninstrument


class PropagateInstrumentor(BaseInstrumentor):  # type: ignore[misc,unused-ignore]
    """`propagate.instrument` as an OpenTelemetry instrumentor: nothing to depend on, since
    what it patches is the standard library."""

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        instrument()

    def _uninstrument(self, **kwargs: Any) -> None:
        uninstrument()
