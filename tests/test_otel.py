"""propagate/_otel.py: the one seam to OpenTelemetry, one error rule, one span identity."""

from __future__ import annotations

import ast
import asyncio
import pathlib
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

import propagate
from propagate import _otel, _relay
from propagate.dns import Resolver

TRACER = trace.get_tracer("tests")
PACKAGE = pathlib.Path(propagate.__file__).parent

# Whose own code may import OpenTelemetry: the seam, the relay (the SDK side), the SDK's
# private attributes, the runtime context (which OpenTelemetry itself loads, and which
# may import nothing but opentelemetry.context.context), the instrumentor that
# opentelemetry-instrument loads; and the satellites, which configure or report on a provider.
SEAM = {"_otel.py", "_relay.py", "_private.py",
        "_runtime.py",  # the runtime context: OpenTelemetry loads it, half imported
        "_instrumentor.py"}  # an entry point of opentelemetry-instrumentation, which loads it
SATELLITES = {"_demo.py", "pytest_plugin.py", "debug/_doctor.py"}

RAISED = [ValueError("boom"), asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(3)]


def otel_imports(path: pathlib.Path) -> list[str]:
    """The OpenTelemetry modules a file imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("opentelemetry")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opentelemetry"):
            found.append(node.module or "")
    return found


def test_only_the_seam_imports_opentelemetry() -> None:
    """API: the core reaches OpenTelemetry only through _otel (the relay, the SDK's side, and
    _private's guarded reads aside), so there is one place to read what propagate asks of it."""
    importing = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if otel_imports(p)}
    assert importing - SATELLITES == SEAM


def outcome(exporter: InMemorySpanExporter, name: str) -> tuple[Any, str | None, list[str]]:
    """A finished span's status code and description, and its events' names."""
    [s] = [s for s in exporter.get_finished_spans() if s.name == name]
    return s.status.status_code, s.status.description, [e.name for e in s.events]


def otel_outcome(exporter: InMemorySpanExporter, exc: BaseException) -> Any:
    """What OpenTelemetry's own start_as_current_span makes of ``exc``, here."""
    with pytest.raises(type(exc)), TRACER.start_as_current_span("otel"):
        raise exc
    return outcome(exporter, "otel")


@pytest.mark.parametrize("exc", RAISED, ids=lambda e: type(e).__name__)
def test_a_task_span_fails_as_start_as_current_span_does(exporter: InMemorySpanExporter,
                                                         exc: BaseException) -> None:
    """I7: a pool's task span marks each exception as start_as_current_span does here."""
    def task() -> None:
        raise exc

    with propagate.ThreadPoolExecutor(1, task_spans=True) as pool:
        raised = pool.submit(task).exception()
    assert raised is exc
    [name] = [s.name for s in exporter.get_finished_spans()]
    assert outcome(exporter, name) == otel_outcome(exporter, exc)


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()],
                         ids=lambda e: type(e).__name__)
def test_a_dns_lookup_fails_as_start_as_current_span_does(exporter: InMemorySpanExporter,
                                                          exc: BaseException) -> None:
    """I7: a dns.lookup span marks its lookup's exception by the same rule as every other
    span propagate makes (before, lookups marked every BaseException, whatever the release)."""
    def lookup(*question: Any) -> list[Any]:
        raise exc

    with Resolver(max_workers=1, getaddrinfo=lookup) as resolver, pytest.raises(type(exc)):
        resolver.resolve("localhost", 80)
    assert outcome(exporter, "dns.lookup") == otel_outcome(exporter, exc)


STATES = [TraceState(), TraceState([("vendor", "value"), ("other", "1")])]


@pytest.mark.parametrize("state", STATES, ids=["no-state", "state"])
@pytest.mark.parametrize("remote", [True, False])
@pytest.mark.parametrize("flags", [TraceFlags.DEFAULT, TraceFlags.SAMPLED])
def test_one_encoding_of_a_span_identity(state: TraceState, remote: bool,
                                         flags: TraceFlags) -> None:
    """I6: a SpanContext survives the one identity encoding, as a task's parent and as the
    relay's parent or link, whether it is remote or not."""
    sc = SpanContext(0x1234, 0x5678, is_remote=remote, trace_flags=flags, trace_state=state)
    identity = _otel.identity(sc)
    assert isinstance(identity, tuple) and all(not isinstance(f, (SpanContext, TraceState))
                                               for f in identity)
    back = _otel.span_context(identity, remote)
    assert (back.trace_id, back.span_id, back.trace_flags, back.is_remote) == (
        sc.trace_id, sc.span_id, sc.trace_flags, sc.is_remote)
    assert list(back.trace_state.items()) == list(sc.trace_state.items())
    assert _relay._context(_relay._identity(sc)) == back
    assert _otel.span_context(identity) == _otel.span_context(identity, remote=True)


def test_the_identity_read_is_the_identity_written(exporter: InMemorySpanExporter) -> None:
    """I1: the identity of the current span, and of a carrier made from it, are the same
    tuple: one encoding, read from a Context or from headers."""
    with TRACER.start_as_current_span("here") as span:
        identity = _otel.current_identity()
        assert identity == _otel.identity(span.get_span_context())
        carrier = _otel.inject(identity, {"k": "v"})
    assert _otel.extract(carrier) == (identity, {"k": "v"})
