"""propagate/pytest_plugin.py: the spans and no_leaks fixtures and --propagate-jitter.

Most tests run pytest on a user-style test file in a subprocess, as a user's suite would
run with propagate installed; the plugin also runs in this very session (entry point).
"""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
from propagate.pytest_plugin import Spans
from tests.helpers import PROVIDER

pytest_plugins = ["pytester"]

WAIT = 120  # seconds for each pytest subprocess
STRICT = ("-p", "no:cacheprovider", "-W", "error",
          # fork() in a process with threads (Python 3.12+): tested on purpose, as in setup.cfg
          "-W", "ignore:This process:DeprecationWarning")


def run(pytester: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=textwrap.dedent(source))
    return pytester.runpytest_subprocess(*STRICT, *args, timeout=WAIT)


# -- loading -------------------------------------------------------------------------------


def test_plugin_is_registered_as_a_pytest11_entry_point() -> None:
    """API: installing propagate registers the plugin with pytest."""
    found: Any = importlib.metadata.entry_points()
    group = found.select(group="pytest11") if hasattr(found, "select") else found["pytest11"]
    points = [e for e in group if e.name == "propagate"]
    assert {e.value for e in points} == {"propagate.pytest_plugin"}


def test_plugin_loads_without_the_sdk(pytester: pytest.Pytester) -> None:
    """I8: without opentelemetry-sdk the plugin loads and tests run; only spans asks for it."""
    pytester.makepyfile(test_user="""
        import sys

        def test_plain():
            assert "opentelemetry.sdk" not in sys.modules

        def test_spans(spans):
            pass
    """)
    blocker = textwrap.dedent("""
        import sys

        class NoSDK:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
                    raise ImportError("opentelemetry-sdk is not installed (blocked by the test)")

        sys.meta_path.insert(0, NoSDK())
        import pytest
        sys.exit(pytest.main(["-p", "no:cacheprovider", "-W", "error", "test_user.py"]))
    """)
    result = pytester.run(sys.executable, "-c", blocker, timeout=WAIT)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*the spans fixture needs opentelemetry-sdk*propagate[[]sdk]*"])


# -- spans ---------------------------------------------------------------------------------


def test_spans_fixture_sits_beside_the_session_provider(spans: Spans,
                                                        exporter: InMemorySpanExporter) -> None:
    """API: spans adds an exporter to the provider already set; it never replaces it."""
    with propagate.span("here"):
        pass
    assert trace.get_tracer_provider() is PROVIDER
    assert spans.names() == ["here"]
    assert [s.name for s in exporter.get_finished_spans()] == ["here"]


def test_spans_are_kept_only_for_tests_that_ask(request: pytest.FixtureRequest) -> None:
    """I9: outside tests using spans nothing is kept, so a long suite holds no spans."""
    recorder = request.getfixturevalue("_propagate_recorder")
    with propagate.span("unwatched"):
        pass
    assert recorder.exporter.get_finished_spans() == ()


def test_spans_tree_nests_children_and_orders_siblings(spans: Spans) -> None:
    """API: tree() indents by parentage and sorts siblings by name, whatever their order."""
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("request"):
        for name in ("b", "a", "b"):
            with tracer.start_as_current_span(name), tracer.start_as_current_span(f"{name}-leaf"):
                pass
    with tracer.start_as_current_span("another-trace"):
        pass
    assert spans.tree().splitlines() == [
        "another-trace", "request", "  a", "    a-leaf", "  b", "    b-leaf", "  b", "    b-leaf"]
    spans.assert_tree("""
        another-trace
        request
          a
            a-leaf
          b
            b-leaf
          b
            b-leaf
    """)
    with pytest.raises(AssertionError, match=r"expected:\nrequest\nactual:\nanother-trace"):
        spans.assert_tree("request")
    assert len(spans) == 8 and spans[-1] is list(spans)[-1] and spans[-1].name == "another-trace"
    assert [s.name for s in spans.by_name("b")] == ["b", "b"]


def test_spans_fixture_in_a_user_suite(pytester: pytest.Pytester) -> None:
    """I6: a user's test sees its spans, worker-process spans included, cleared between tests."""
    result = run(pytester, """
        import multiprocessing
        import propagate

        def work(n):
            with propagate.span("work"):
                return n

        def test_threads(spans):
            with propagate.span("request"), propagate.ThreadPoolExecutor(2) as pool:
                assert list(pool.map(work, range(3))) == [0, 1, 2]
            assert len(spans) == 4 and spans.names().count("work") == 3
            spans.assert_tree('''
                request
                  work
                  work
                  work
            ''')

        def test_process(spans):
            ctx = multiprocessing.get_context("fork")
            with propagate.span("request"), \\
                    propagate.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                assert pool.submit(work, 5).result(timeout=30) == 5
            spans.assert_tree('''
                request
                  work
            ''')

        def test_cleared(spans):
            assert len(spans) == 0 and list(spans) == []

        def test_mismatch_is_shown(spans):
            with propagate.span("actual-span"):
                pass
            spans.assert_tree("expected-span")
    """)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*span tree differs*", "*expected:*", "*expected-span*",
                                 "*actual:*", "*actual-span*"])


def test_spans_fixture_joins_a_users_provider(pytester: pytest.Pytester) -> None:
    """API: with a user's SDK provider set, spans reach both its exporter and the fixture."""
    pytester.makeconftest("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        OWN = InMemorySpanExporter()
        PROVIDER = TracerProvider()
        PROVIDER.add_span_processor(SimpleSpanProcessor(OWN))
        trace.set_tracer_provider(PROVIDER)
    """)
    result = run(pytester, """
        from opentelemetry import trace
        import propagate
        from conftest import OWN, PROVIDER

        def test_both(spans):
            with propagate.span("mine"):
                pass
            assert trace.get_tracer_provider() is PROVIDER
            assert spans.names() == ["mine"]
            assert [s.name for s in OWN.get_finished_spans()] == ["mine"]
    """)
    result.assert_outcomes(passed=1)


def test_spans_fixture_refuses_a_provider_that_is_not_the_sdks(pytester: pytest.Pytester) -> None:
    """API: a global provider that cannot record gives a clear error, not an empty list."""
    pytester.makeconftest("""
        from opentelemetry import trace

        trace.set_tracer_provider(trace.NoOpTracerProvider())
    """)
    result = run(pytester, """
        def test_spans(spans):
            pass
    """)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*needs opentelemetry-sdk's TracerProvider*NoOpTracerProvider*"])


# -- no_leaks ------------------------------------------------------------------------------


def test_no_leaks_fails_tests_whose_workers_outlive_them(pytester: pytest.Pytester) -> None:
    """API: a thread, child process or asyncio task left running fails its test, by name."""
    result = run(pytester, """
        import asyncio
        import multiprocessing
        import threading
        import time

        import propagate

        LOOPS = []  # kept open on purpose: the task on it is still pending

        def test_clean_thread_pool(no_leaks):
            with propagate.ThreadPoolExecutor(2) as pool:
                assert pool.submit(abs, -1).result(timeout=30) == 1
            threading.Thread(target=time.sleep, args=(0.05,)).start()  # ends within the grace

        def test_clean_process_pool(no_leaks):
            ctx = multiprocessing.get_context("fork")
            with propagate.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                assert pool.submit(abs, -1).result(timeout=30) == 1

        def test_leaks_a_process(no_leaks):
            ctx = multiprocessing.get_context("fork")
            ctx.Process(target=time.sleep, args=(60,), name="leaked-process", daemon=True).start()

        def test_leaks_a_task(no_leaks):
            async def start():
                asyncio.create_task(asyncio.sleep(60), name="leaked-task")

            LOOPS.append(asyncio.new_event_loop())
            LOOPS[-1].run_until_complete(start())

        def test_leaks_a_thread(no_leaks):
            stop = threading.Event()
            threading.Thread(target=stop.wait, args=(60,), name="leaked-thread",
                             daemon=True).start()
    """)
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_leaks_a_process*", "*process 'leaked-process'*",
        "*ERROR at teardown of test_leaks_a_task*", "*task 'leaked-task'*",
        "*ERROR at teardown of test_leaks_a_thread*", "*daemon thread 'leaked-thread'*",
    ])
    assert "test_clean" not in "\n".join(line for line in result.outlines if "ERROR" in line)


# -- jitter --------------------------------------------------------------------------------

JITTERED = """
    import propagate
    import propagate.debug
    from propagate import _switch

    def test_runs_under_jitter():
        hook = _switch.hook
        assert isinstance(hook, propagate.debug.Jitter) and hook.seed == 7
        with propagate.ThreadPoolExecutor(2) as pool:
            assert pool.submit(abs, -1).result(timeout=30) == 1
        assert hook.counts["task-start"] == hook.counts["task-end"] == 1

    def test_fails_under_jitter():
        with propagate.ThreadPoolExecutor(1) as pool:
            pool.submit(abs, -1).result(timeout=30)
        assert False, "on purpose"
"""


def test_jitter_option_runs_every_test_under_jitter(pytester: pytest.Pytester) -> None:
    """API: --propagate-jitter=SEED jitters each test and reports the seed to rerun with."""
    result = run(pytester, JITTERED, "--propagate-jitter=7")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "propagate jitter: seed=7 probability=* max_delay=*s (rerun with --propagate-jitter=7)",
        "*propagate jitter*",
        "seed=7: * sleeps, *s in all, at {'capture': 1, *} switch points "
        "(rerun with --propagate-jitter=7)",
    ])


def test_without_the_option_nothing_is_jittered(pytester: pytest.Pytester) -> None:
    """API: without --propagate-jitter no hook is installed and the header says nothing."""
    result = run(pytester, """
        from propagate import _switch

        def test_no_hook():
            assert _switch.hook is None
    """)
    result.assert_outcomes(passed=1)
    assert "propagate jitter" not in result.stdout.str()
