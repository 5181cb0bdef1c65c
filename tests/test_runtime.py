"""propagate/_runtime.py: OTEL_PYTHON_CONTEXT=propagate, where a foreign detach is safe."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import opentelemetry.context as otel_context
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from propagate import _runtime
from tests.helpers import assert_demo_tree, one_span

TRACER = trace.get_tracer("tests")
WAIT = 30


@pytest.fixture
def runtime() -> Iterator[_runtime.RuntimeContext]:
    """propagate's runtime context as OpenTelemetry's, for the test (as the entry point
    makes it for a process: see test_the_entry_point_loads_it)."""
    before = otel_context._RUNTIME_CONTEXT
    ours = otel_context._RUNTIME_CONTEXT = _runtime.RuntimeContext()
    try:
        yield ours
    finally:
        otel_context._RUNTIME_CONTEXT = before


def on_thread(fn: Any) -> None:
    """Run ``fn`` on a thread of its own (its own Context), to the end."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(WAIT)
    assert not failed, failed


def exit_elsewhere(*scopes: Any) -> None:
    """Exit ``scopes`` (entered here) on a thread of their own."""
    on_thread(lambda: [scope.__exit__(None, None, None) for scope in scopes])


def current_span() -> Any:
    return trace.get_current_span()


def test_the_entry_point_loads_it() -> None:
    """API: OTEL_PYTHON_CONTEXT=propagate makes OpenTelemetry load this runtime (its entry
    point is loaded while opentelemetry.context is half imported), and logs nothing."""
    code = textwrap.dedent("""
        import sys
        from opentelemetry import trace  # imports opentelemetry.context, which loads it
        import opentelemetry.context as c
        print(type(c._RUNTIME_CONTEXT).__module__, type(c._RUNTIME_CONTEXT).__name__)
        print(sorted(m for m in sys.modules if m.startswith("propagate")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=WAIT, env={**os.environ, "OTEL_PYTHON_CONTEXT": "propagate"},
                          check=True)
    runtime_line, modules = done.stdout.splitlines()
    assert runtime_line == "propagate._runtime RuntimeContext"
    assert "Failed to load context" not in done.stderr and done.stderr == ""
    assert modules == str(["propagate", "propagate._errors", "propagate._heal",
                           "propagate._runtime", "propagate._version"])


def test_a_scope_exited_on_another_thread_heals_its_context(
        runtime: _runtime.RuntimeContext, exporter: InMemorySpanExporter) -> None:
    """I4: a plain OpenTelemetry scope exited on another thread logs nothing (the autouse
    check), and the entering Context is back on the parent at its next use of the API."""
    with TRACER.start_as_current_span("parent") as parent:
        scope = TRACER.start_as_current_span("moved")
        moved = scope.__enter__()
        exit_elsewhere(scope)
        assert runtime._orphans
        assert current_span() is parent
        assert not runtime._orphans and not runtime._heals  # back to the fast path
    assert current_span() is trace.INVALID_SPAN
    assert one_span(exporter, "moved").context.span_id == moved.get_span_context().span_id


def test_a_streaming_generator_closed_in_another_task(runtime: _runtime.RuntimeContext,
                                                      exporter: InMemorySpanExporter) -> None:
    """I4: a generator whose span is current across its yields (as streaming responses
    are), closed in another asyncio task, leaves the consuming task on its own span."""
    def stream() -> Iterator[int]:
        with TRACER.start_as_current_span("stream"):
            yield 1
            yield 2

    async def main() -> tuple[Any, Any]:
        with TRACER.start_as_current_span("request") as request:
            chunks = stream()
            next(chunks)  # the stream's span is current here now, as with the default runtime
            await asyncio.create_task(asyncio.to_thread(chunks.close))  # closed elsewhere
            after = current_span()
            with TRACER.start_as_current_span("next") as following:
                pass
        return request, (after, following)

    request, (after, following) = asyncio.run(main())
    assert after is request
    assert one_span(exporter, "next").parent.span_id == (  # type: ignore[union-attr]
        request.get_span_context().span_id)
    assert following.get_span_context().span_id != 0
    assert [s.name for s in exporter.get_finished_spans()] == ["stream", "next", "request"]


def test_an_attach_made_over_an_orphaned_one_is_left_alone(
        runtime: _runtime.RuntimeContext) -> None:
    """I4: if something was attached over the orphaned context, it stays current until
    it is detached; then the orphaned one is undone too."""
    with TRACER.start_as_current_span("parent") as parent:
        scope = TRACER.start_as_current_span("moved")
        scope.__enter__()
        with TRACER.start_as_current_span("inner") as inner:
            exit_elsewhere(scope)
            assert current_span() is inner
            assert current_span() is inner
        assert current_span() is parent
    assert not runtime._orphans


def test_two_nested_scopes_both_exited_elsewhere(runtime: _runtime.RuntimeContext) -> None:
    """I4: an outer and an inner scope both exited on other threads, in either order,
    leave the entering Context on the parent, innermost undone first."""
    for order in ("inner first", "outer first"):
        with TRACER.start_as_current_span("parent") as parent:
            outer = TRACER.start_as_current_span("outer")
            outer.__enter__()
            inner = TRACER.start_as_current_span("inner")
            inner.__enter__()
            exit_elsewhere(*((inner, outer) if order == "inner first" else (outer, inner)))
            assert current_span() is parent, order
        assert not runtime._orphans and not runtime._heals


def test_until_a_foreign_detach_nothing_checks(runtime: _runtime.RuntimeContext) -> None:
    """I9: until a foreign detach, get_current is the ContextVar's own method (no Python
    frame) and attach only says which context its token set."""
    assert runtime.get_current == runtime._current_context.get and not runtime._heals
    context = otel_context.Context({"k": "v"})
    token = otel_context.attach(context)
    assert isinstance(token[0], contextvars.Token) and token[1] is context
    otel_context.detach(token)
    assert not runtime._heals


def test_a_copy_of_the_entering_context_is_not_healed(runtime: _runtime.RuntimeContext) -> None:
    """I2: a Context copied while the orphaned context was current keeps its own current
    context (it cannot be reset there), pays for the check once, and the Context that
    attached still heals."""
    with TRACER.start_as_current_span("parent") as parent:
        scope = TRACER.start_as_current_span("moved")
        moved = scope.__enter__()
        copy = contextvars.copy_context()
        exit_elsewhere(scope)
        assert copy.run(current_span) is moved
        assert copy.run(runtime._checked.get) is not None  # checked: skipped from now on
        assert copy.run(current_span) is moved
        assert current_span() is parent


def test_an_orphan_whose_context_cannot_run_again_is_forgotten(
        runtime: _runtime.RuntimeContext) -> None:
    """I5, I9: an orphan whose entering Context nobody refers to any more is dropped (it
    would keep that Context alive and every call on the healing path)."""
    def enter() -> Any:
        scope = TRACER.start_as_current_span("moved")
        scope.__enter__()
        return scope

    gone = contextvars.Context()
    scope = gone.run(enter)
    exit_elsewhere(scope)
    assert len(runtime._orphans) == 1
    del gone, scope
    gc.collect()
    current_span()  # a check here finds nothing to heal, and sweeps
    assert runtime._orphans == [] and not runtime._heals


def test_orphans_are_bounded(runtime: _runtime.RuntimeContext) -> None:
    """I9: at most MAX_ORPHANS foreign detaches wait to heal; the oldest are forgotten."""
    def enter() -> Any:
        scope = TRACER.start_as_current_span("moved")
        scope.__enter__()
        return scope

    kept = [contextvars.Context() for _ in range(_runtime.MAX_ORPHANS + 6)]
    scopes = [ctx.run(enter) for ctx in kept]
    exit_elsewhere(*scopes)
    assert len(runtime._orphans) == _runtime.MAX_ORPHANS
    assert runtime._orphans[0].where is kept[6]


def test_detach_in_the_same_context_is_the_default_runtimes(
        runtime: _runtime.RuntimeContext) -> None:
    """API: in the Context that attached, detach resets as OpenTelemetry's default does,
    and a token used twice still raises there (the API then logs it, as by default)."""
    context = otel_context.Context({"k": "v"})
    token = runtime.attach(context)
    assert runtime.get_current() is context
    runtime.detach(token)
    assert runtime.get_current() == otel_context.Context()
    with pytest.raises(RuntimeError):
        runtime.detach(token)
    assert not runtime._orphans


def test_propagate_span_keeps_its_own_rules_under_it(runtime: _runtime.RuntimeContext,
                                                     exporter: InMemorySpanExporter) -> None:
    """I4: under this runtime, a propagate.span exited on another thread still warns and
    is ended on the entering thread, when it heals (the runtime does not take it over)."""
    with TRACER.start_as_current_span("parent") as parent:
        scope = propagate.span("moved")
        scope.__enter__()
        with pytest.warns(propagate.CrossThreadExitWarning):
            exit_elsewhere(scope)
        assert exporter.get_finished_spans() == ()  # not ended on the foreign thread
        assert not runtime._orphans
        with propagate.span("next") as following:
            assert following.parent.span_id == (  # type: ignore[attr-defined]
                parent.get_span_context().span_id)
    assert [s.name for s in exporter.get_finished_spans()] == ["moved", "next", "parent"]


def test_the_demo_under_it_is_one_tree() -> None:
    """I1, I6: with OTEL_PYTHON_CONTEXT=propagate the demo's request is still one tree,
    through threads, a process pool and asyncio (everything propagate does works)."""
    done = subprocess.run([sys.executable, "-m", "propagate", "demo", "--json"],
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "OTEL_PYTHON_CONTEXT": "propagate"})
    assert_demo_tree(json.loads(done.stdout))
    assert "Failed" not in done.stderr
