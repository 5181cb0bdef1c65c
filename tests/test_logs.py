"""relay_logs: worker log records handled by the submitter's loggers (propagate._logs)."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs import export as log_export

try:  # OpenTelemetry's logging handler moved here from the SDK, which deprecated its own
    from opentelemetry.instrumentation.logging.handler import LoggingHandler
except ImportError:
    from opentelemetry.sdk._logs import LoggingHandler  # type: ignore[assignment,unused-ignore]

import propagate
from propagate.debug import ContextFilter
from tests import log_tasks
from tests.helpers import START_METHODS, current_ids

LOGGER = "tests.log_tasks"
request_id: ContextVar[str] = propagate.register(ContextVar("tests.logs.request_id"))


class Kept(logging.Handler):
    """Keeps each record it handles, with the trace ids `ContextFilter` gave it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def kept() -> Iterator[Kept]:
    """A handler on the tests' task logger, which is at INFO here (a fresh worker's is not)."""
    handler = Kept()
    logger = logging.getLogger(LOGGER)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture(params=START_METHODS)
def pool(request: pytest.FixtureRequest) -> Iterator[propagate.ProcessPoolExecutor]:
    with propagate.ProcessPoolExecutor(
            1, multiprocessing.get_context(request.param), relay_logs=True) as made:
        yield made


def test_records_come_home_once_in_order_under_the_worker_span(
        pool: propagate.ProcessPoolExecutor, kept: Kept, tracer: trace.Tracer) -> None:
    """I6: a worker's INFO records reach this process's handler once each, in order, before
    the future resolves, with the worker's span (child of the submitter's) current."""
    with tracer.start_as_current_span("submitter"):
        trace_id, _ = current_ids()
        seen = pool.submit(log_tasks.log_in_span, "work", *map(str, range(20))).result()
    assert kept.messages() == [str(i) for i in range(20)]  # here already: before the future
    for record in kept.records:
        assert record.process == seen["pid"] != os.getpid()
        assert record.otelSpanID == f"{seen['span_id']:016x}"  # type: ignore[attr-defined]
        assert record.otelTraceID == f"{trace_id:032x}"  # type: ignore[attr-defined]


def test_this_process_levels_decide(pool: propagate.ProcessPoolExecutor, kept: Kept) -> None:
    """I6: the submitter's logger levels choose what comes home, read again when they change;
    a fresh worker's own root at WARNING does not drop INFO."""
    own_level = pool.submit(log_tasks.log_levels, LOGGER + ".child").result()
    assert kept.messages() == ["at INFO", "at WARNING", "at ERROR"]
    if pool._mp_context.get_start_method() != "fork":  # type: ignore[attr-defined]
        assert own_level == logging.WARNING  # the worker's, which did not decide
    kept.records.clear()
    logging.getLogger(LOGGER + ".child").setLevel(logging.DEBUG)
    try:
        pool.submit(log_tasks.log_levels, LOGGER + ".child").result()
    finally:
        logging.getLogger(LOGGER + ".child").setLevel(logging.NOTSET)
    assert kept.messages() == ["at DEBUG", "at INFO", "at WARNING", "at ERROR"]
    kept.records.clear()
    logging.disable(logging.WARNING)
    try:
        pool.submit(log_tasks.log_levels, LOGGER).result()
    finally:
        logging.disable(logging.NOTSET)
    assert kept.messages() == ["at ERROR"]


@pytest.mark.parametrize("method", START_METHODS)
def test_no_duplicates_with_handlers_in_the_worker(method: str, tmp_path: Path) -> None:
    """I6: a handler the worker inherited through fork, or added itself (as a re-imported
    ``__main__`` does under spawn), sees none of a task's records: each is written once."""
    path = tmp_path / "log.txt"
    handler = logging.FileHandler(path)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with propagate.ProcessPoolExecutor(
                1, multiprocessing.get_context(method), initializer=log_tasks.add_file_handler,
                initargs=(str(path),), relay_logs=True) as pool:
            pool.submit(log_tasks.log_in_span, "work", "once", "twice?").result()
            assert pool.submit(log_tasks.handlers_on, LOGGER).result() >= 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        handler.close()
    assert path.read_text().splitlines() == ["once", "twice?"]


def test_records_of_a_failing_task_come_home(pool: propagate.ProcessPoolExecutor,
                                             kept: Kept) -> None:
    """I6: records ride home on the task's exception too, before the future resolves."""
    with pytest.raises(ValueError, match="boom"):
        pool.submit(log_tasks.log_then_fail, "boom").result()
    assert kept.messages() == ["boom"]


def test_unpicklable_arguments_are_formatted_in_the_worker(
        pool: propagate.ProcessPoolExecutor, kept: Kept) -> None:
    """I7: a record whose arguments cannot be pickled comes home formatted, not lost."""
    pool.submit(log_tasks.log_unpicklable).result()
    (record,) = kept.records
    assert record.getMessage() == "holding <Opaque>"
    assert record.args is None


def test_an_exception_comes_home_with_its_traceback(pool: propagate.ProcessPoolExecutor,
                                                    kept: Kept) -> None:
    """I6: ``log.exception`` in a worker arrives with the worker's traceback, formatted."""
    assert pool.submit(log_tasks.log_exception).result() == "handled"
    (record,) = kept.records
    text = logging.Formatter().format(record)
    assert text.startswith("lookup failed\nTraceback (most recent call last):")
    assert "in log_exception" in text and text.endswith("KeyError: 'missing'")
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_registered_values_and_baggage_of_the_moment_are_current(
        pool: propagate.ProcessPoolExecutor, kept: Kept) -> None:
    """I1: while a record is handled, the registered ContextVars have the values the worker
    had when it logged, not the submitter's."""
    seen: list[str | None] = []

    class Reads(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(request_id.get(None))
            return True

    reads = Reads()
    kept.addFilter(reads)
    token = request_id.set("submitted")
    try:
        pool.submit(log_tasks.log_with_value, "tests.logs.request_id", "in-worker").result()
    finally:
        request_id.reset(token)
    assert kept.messages() == ["before", "after"]
    assert seen == ["submitted", "in-worker"]
    assert request_id.get(None) is None


def test_a_failing_handler_never_fails_the_task(pool: propagate.ProcessPoolExecutor,
                                                kept: Kept,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """I9: a handler or filter that raises is reported as logging reports it; the task's
    result still arrives, and the next record is still handled."""

    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler broke")

    class Raises(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage() == "0":
                raise RuntimeError("filter broke")
            return True

    logger = logging.getLogger(LOGGER)
    broken = Broken()
    broken.addFilter(Raises())  # on a handler: only this process has it (fork copies loggers')
    logger.addHandler(broken)
    try:
        seen = pool.submit(log_tasks.log_in_span, "work", "0", "1").result()
    finally:
        logger.removeHandler(broken)
    assert seen["pid"] != os.getpid()
    assert kept.messages() == ["0", "1"]
    err = capsys.readouterr().err
    assert "filter broke" in err and "handler broke" in err


def test_opentelemetry_logging_handler_sees_the_worker_span(
        pool: propagate.ProcessPoolExecutor, tracer: trace.Tracer) -> None:
    """I6: OpenTelemetry's logging handler, here, exports the worker's record with the
    worker's trace and span ids."""
    # renamed in opentelemetry-sdk 1.39, the old name deprecated
    exporter = getattr(log_export, "InMemoryLogRecordExporter", None)
    exporter = (exporter or log_export.InMemoryLogExporter)()
    provider = LoggerProvider()
    provider.add_log_record_processor(log_export.SimpleLogRecordProcessor(exporter))
    handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with tracer.start_as_current_span("submitter"):
            trace_id, _ = current_ids()
            seen = pool.submit(log_tasks.log_in_span, "work", "bridged").result()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        provider.shutdown()
    (exported,) = exporter.get_finished_logs()
    assert exported.log_record.body == "bridged"
    assert exported.log_record.trace_id == trace_id
    assert exported.log_record.span_id == seen["span_id"]


def test_without_relay_logs_records_stay_in_the_worker(kept: Kept) -> None:
    """API: relay_logs is off by default: the submitter's handlers see no worker record."""
    with propagate.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        pool.submit(log_tasks.log_in_span, "work", "stays").result()
    assert kept.records == []


def test_wrap_executor_relays_logs(kept: Kept) -> None:
    """I6: ``wrap_executor(..., relay_logs=True)`` on the stdlib's process pool brings them
    home; on a thread pool the records are this process's own, handled once as ever."""
    with cf.ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as stdlib:
        pool = propagate.wrap_executor(stdlib, relay_logs=True)
        pool.submit(log_tasks.log_in_span, "work", "from a process").result()
    with cf.ThreadPoolExecutor(1) as stdlib_threads:
        threads = propagate.wrap_executor(stdlib_threads, relay_logs=True)
        threads.submit(log_tasks.log_in_span, "work", "from a thread").result()
    assert kept.messages() == ["from a process", "from a thread"]


@pytest.mark.skipif(sys.version_info < (3, 14), reason="InterpreterPoolExecutor is 3.14+")
def test_interpreter_pool_relays_logs(kept: Kept, tracer: trace.Tracer) -> None:
    """I6: a subinterpreter's records come home too, under its span."""
    pool = propagate.InterpreterPoolExecutor(1, relay_logs=True)  # type: ignore[attr-defined,unused-ignore]
    with pool, tracer.start_as_current_span("submitter"):
        seen = pool.submit(log_tasks.log_in_span, "work", "from an interpreter").result()
    assert kept.messages() == ["from an interpreter"]
    assert kept.records[0].otelSpanID == f"{seen['span_id']:016x}"  # type: ignore[attr-defined]


def test_relay_logs_is_checked_where_the_pool_is_made() -> None:
    """API: relay_logs must be a bool; wrap_executor cannot change an own pool's."""
    with pytest.raises(TypeError, match="relay_logs must be True or False"):
        propagate.ProcessPoolExecutor(1, relay_logs=1)  # type: ignore[arg-type]
    with propagate.ProcessPoolExecutor(1) as pool, pytest.raises(ValueError, match="relay_logs"):
        propagate.wrap_executor(pool, relay_logs=True)


def test_relay_logs_needs_the_sdk() -> None:
    """I7: without opentelemetry-sdk, relay_logs=True fails where the pool is made, saying
    what to install."""
    script = textwrap.dedent("""
        import sys
        sys.modules["opentelemetry.sdk"] = None  # as if it were not installed
        import propagate
        try:
            propagate.ProcessPoolExecutor(1, relay_logs=True)
        except ImportError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent).stdout
    assert "propagate[sdk]" in out


def test_levels_are_read_once_until_they_change() -> None:
    """I9: the levels a task carries are read again only after a level changed."""
    from propagate import _logs

    first = _logs.levels()
    assert _logs.levels() is first
    logging.getLogger("tests.logs.some.logger").setLevel(logging.ERROR)
    try:
        changed = _logs.levels()
        assert changed is not first and changed[1]["tests.logs.some.logger"] == logging.ERROR
    finally:
        logging.getLogger("tests.logs.some.logger").setLevel(logging.NOTSET)
    assert "tests.logs.some.logger" not in _logs.levels()[1]


def test_capture_follows_logging_hierarchy() -> None:
    """I6: a worker asks the submitter's levels as logging would: own level, nearest
    ancestor's, then the root's; ``logging.disable`` first."""
    from propagate import _logs

    found = _logs.Capture((logging.INFO, {"root": logging.WARNING, "a": logging.DEBUG,
                                          "a.b.c": logging.ERROR}))
    assert found.enabled("a.b", logging.DEBUG) is False  # disabled up to INFO
    assert found.enabled("a.b", logging.WARNING) is True
    assert found.enabled("a.b.c", logging.WARNING) is False
    assert found.enabled("a.b.c.d", logging.ERROR) is True
    assert found.enabled("other", logging.WARNING) is True
    found = _logs.Capture((logging.NOTSET, {"root": logging.WARNING, "a": logging.DEBUG}))
    assert found.enabled("a.x", logging.DEBUG) is True
    assert found.enabled("ab", logging.INFO) is False  # not a child of "a"
