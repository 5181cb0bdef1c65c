"""Fixtures: the session's SDK tracer provider (`tests.helpers`), cleared per test.

Plain helpers live in `tests.helpers`; test modules import them from there, never from
this file.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.helpers import EXPORTER, START_METHODS, THREADS, detach_failures


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """The session's in-memory exporter, empty at the start of the test."""
    EXPORTER.clear()
    THREADS.clear()
    yield EXPORTER


@pytest.fixture
def tracer() -> trace.Tracer:
    return trace.get_tracer("tests")


@pytest.fixture(autouse=True)
def no_detach_failures(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """I4: nothing in any test logs "Failed to detach context"."""
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    yield
    failures = detach_failures(caplog.records)
    assert not failures, failures


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    """Every test starts and ends with no current span."""
    assert not trace.get_current_span().get_span_context().is_valid
    yield
    assert not trace.get_current_span().get_span_context().is_valid


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    """Each available multiprocessing start method in turn."""
    return multiprocessing.get_context(request.param)
