"""The command line: ``python -m propagate demo | doctor`` (run as a user would)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import assert_demo_tree


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "propagate", *args], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def demo_spans() -> list[dict[str, object]]:
    done = run("demo", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_demo_prints_one_connected_tree() -> None:
    """I1, I3, I4, I6: the demo's request is one trace; only the linked job starts another;
    the stream closed in another task logs nothing; the workers' log lines arrive, each
    naming the worker span it was logged in."""
    done = run("demo")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    first = done.stdout.splitlines()[0]
    assert "in 2 traces; 2 of 2 spans from worker processes arrived" in first
    assert "↪ linked from 'GET /report'" in done.stdout
    logs = done.stdout.split("handled here:\n")[1].splitlines()[:2]
    assert sorted(line.split(" (span ")[0].split(" in ")[1] for line in logs) == [
        "'render page 0'", "'render page 1'"]
    assert all(line.startswith("INFO pid ") and "rendered page" in line for line in logs)


def test_demo_json_parentage(demo_spans: list[dict[str, object]]) -> None:
    """I1, I6: every span but the background job descends from the request, processes included."""
    assert_demo_tree(demo_spans)


def test_demo_stdlib_shows_the_broken_tree() -> None:
    """I1, I6: the baseline: the stdlib's run of the same request falls apart: orphans, and
    worker spans lost."""
    done = run("demo", "--stdlib")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert "0 of 2 spans from worker processes arrived" in first
    assert "Failed to detach context" in done.stderr  # the stream, closed in another task
    lines = done.stdout.splitlines()
    stream = next(i for i, line in enumerate(lines) if line.strip().startswith("stream rows"))
    indent = len(lines[stream]) - len(lines[stream].lstrip())
    assert lines[stream + 1].startswith(" " * (indent + 2) + "summarize")  # the wrong parent
    assert "handled here:\n(none arrived)" in done.stdout
    traces = int(first.split(" spans in ")[1].split(" traces")[0])
    # Under 3.14's thread_inherit_context each stdlib thread starts in a copy of its
    # creator's context, so this request's threads stay in one trace (a reused worker
    # would carry a stale one): there, only the worker processes' spans are lost.
    if not getattr(sys.flags, "thread_inherit_context", False):
        assert traces > 5


def test_doctor_reports_what_a_bug_report_needs() -> None:
    """API: doctor prints the interpreter, versions, provider and start method, and exits 0."""
    done = run("doctor")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    for label in ("python", "free-threaded build", "default start method", "opentelemetry-api",
                  "opentelemetry-sdk", "cloudpickle", "tracer provider", "propagators",
                  "registered ContextVars", "loop default executor propagates"):
        assert label in done.stdout


def test_demo_help_names_the_engines() -> None:
    """API: the demo's --help says which engines propagate reaches beyond it."""
    done = run("demo", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for module in ("propagate.dask", "propagate.ray", "propagate.joblib"):
        assert module in text
