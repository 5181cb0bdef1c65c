"""pytest fixtures for testing code that uses propagate: ``spans``, ``no_leaks``, jitter.

Loaded by the ``pytest11`` entry point once propagate is installed:

* ``spans``: the spans finished during the test, in an in-memory exporter on the global
  opentelemetry-sdk ``TracerProvider`` (the ``sdk`` extra; only this fixture needs it);
* ``no_leaks``: fails the test when a thread, child process or asyncio task started
  during it still runs after it, allowing `LEAK_GRACE` seconds to finish;
* ``--propagate-jitter=SEED``: every test runs under
  ``propagate.debug.jitter(SEED, JITTER_PROBABILITY, JITTER_MAX_DELAY)``. The seed is in
  the report header, and in the report of each failing test with the sleeps it caused.
"""

from __future__ import annotations

import textwrap
from collections.abc import Generator, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

import pytest

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from .debug import Jitter

JITTER_PROBABILITY = 0.5
"""Under ``--propagate-jitter``, the chance that a switch point sleeps."""
JITTER_MAX_DELAY = 0.001
"""The longest sleep, in seconds: enough to reorder threads, cheap enough for a suite."""
LEAK_GRACE = 1.0
"""How long ``no_leaks`` waits, in seconds, for threads and processes that are finishing."""

_JITTER: pytest.StashKey[Jitter] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--propagate-jitter SEED``."""
    parser.getgroup("propagate").addoption(
        "--propagate-jitter", type=int, metavar="SEED", default=None,
        help=f"run every test under propagate.debug.jitter(SEED), sleeping up to "
             f"{JITTER_MAX_DELAY}s at {JITTER_PROBABILITY:.0%} of propagate's switch points")


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Under ``--propagate-jitter``, the seed and the line that reruns it."""
    seed = config.getoption("propagate_jitter")
    if seed is None:
        return []
    return [f"propagate jitter: seed={seed} probability={JITTER_PROBABILITY} "
            f"max_delay={JITTER_MAX_DELAY}s (rerun with --propagate-jitter={seed})"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under ``--propagate-jitter``, run the test (setup, call, teardown) under a jitter."""
    seed = item.config.getoption("propagate_jitter")
    if seed is None:
        yield
        return
    from . import debug

    with debug.jitter(seed, JITTER_PROBABILITY, JITTER_MAX_DELAY) as hook:
        item.stash[_JITTER] = hook
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                               call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failed test's report says how its jitter went and how to rerun it."""
    outcome = yield
    hook = item.stash.get(_JITTER, None)
    report = outcome.get_result()
    if hook is not None and report.failed:
        report.sections.append(("propagate jitter", (
            f"seed={hook.seed}: {hook.delays} sleeps, {hook.slept:.4f}s in all, "
            f"at {hook.counts} switch points (rerun with --propagate-jitter={hook.seed})")))


# -- spans ---------------------------------------------------------------------------------


class Spans(Sequence["ReadableSpan"]):
    """The spans finished so far in this test, oldest first, read live from the exporter."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter: InMemorySpanExporter = exporter
        """The exporter the spans are read from."""

    def __len__(self) -> int:
        return len(self.exporter.get_finished_spans())

    @overload
    def __getitem__(self, index: int) -> ReadableSpan: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ReadableSpan]: ...

    def __getitem__(self, index: int | slice) -> ReadableSpan | Sequence[ReadableSpan]:
        return self.exporter.get_finished_spans()[index]

    def __iter__(self) -> Iterator[ReadableSpan]:
        return iter(self.exporter.get_finished_spans())

    def names(self) -> list[str]:
        """The spans' names, oldest first."""
        return [span.name for span in self]

    def by_name(self, name: str) -> list[ReadableSpan]:
        """The spans named ``name``, oldest first."""
        return [span for span in self if span.name == name]

    def tree(self) -> str:
        """One line per span, indented two spaces under its parent.

        A span whose parent was not recorded here is a root. Siblings are in name order
        (then start order), so the tree does not depend on how threads were scheduled.
        """
        spans = list(self)
        ids = {span.context.span_id for span in spans if span.context is not None}
        children: dict[int | None, list[ReadableSpan]] = {}
        for span in spans:
            parent = None if span.parent is None else span.parent.span_id
            children.setdefault(parent if parent in ids else None, []).append(span)
        lines: list[str] = []

        def draw(span: ReadableSpan, depth: int) -> None:
            lines.append("  " * depth + span.name)
            key = None if span.context is None else span.context.span_id
            for child in sorted(children.get(key, []), key=_sibling_order):
                draw(child, depth + 1)

        for root in sorted(children.get(None, []), key=_sibling_order):
            draw(root, 0)
        return "\n".join(lines)

    def assert_tree(self, expected: str) -> None:
        """Fail unless `tree` equals ``expected`` (dedented; blank edge lines ignored)."""
        lines = textwrap.dedent(expected).strip("\n").splitlines()
        want = "\n".join(line.rstrip() for line in lines)
        got = self.tree()
        if got != want:
            raise AssertionError(f"span tree differs\nexpected:\n{want}\nactual:\n{got}")

    def __repr__(self) -> str:
        return f"<Spans {self.names()!r}>"


def _sibling_order(span: ReadableSpan) -> tuple[str, int]:
    return (span.name, span.start_time or 0)


class _Recorder:
    """An in-memory exporter on the global SDK provider, exporting only while a test records."""

    def __init__(self) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )
        except ImportError as exc:
            pytest.fail(f"the spans fixture needs opentelemetry-sdk: pip install "
                        f"'propagate[sdk]' ({exc})", pytrace=False)
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider):  # none set yet: set one
            trace.set_tracer_provider(TracerProvider())
            provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            pytest.fail(f"the spans fixture needs opentelemetry-sdk's TracerProvider as the "
                        f"global tracer provider, not {provider!r}", pytrace=False)
        recorder = self

        class WhileRecording(SimpleSpanProcessor):
            def on_end(self, span: ReadableSpan) -> None:
                if recorder.recording:
                    super().on_end(span)

        self.recording = False
        self.exporter = InMemorySpanExporter()
        provider.add_span_processor(WhileRecording(self.exporter))  # beside, never instead


@pytest.fixture(scope="session")
def _propagate_recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def spans(_propagate_recorder: _Recorder) -> Iterator[Spans]:
    """The spans finished during this test, as a live `Spans` sequence.

    Records through the global opentelemetry-sdk ``TracerProvider`` (one is set if none
    is; an existing one gets an in-memory exporter added beside its own processors).
    Spans that worker processes relay home are included.
    """
    recorder = _propagate_recorder
    recorder.exporter.clear()
    recorder.recording = True
    try:
        yield Spans(recorder.exporter)
    finally:
        recorder.recording = False
        recorder.exporter.clear()


# -- leaks ---------------------------------------------------------------------------------


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if threads, child processes or asyncio tasks it started outlive it.

    Request it first, so it is set up before, and checks after, the fixtures that start
    and stop workers.
    """
    from . import debug

    before = debug.live()
    yield
    leaks = None
    try:
        debug.assert_quiescent(before, grace=LEAK_GRACE)
    except AssertionError as exc:
        leaks = str(exc)
    if leaks is not None:  # outside the except: the report shows the list, not a chain
        pytest.fail(f"no_leaks: {leaks}", pytrace=False)
