"""``python -m propagate demo``: one realistic request, printed as a span tree.

The same request runs on propagate's tools or, with ``--stdlib``, on the standard
library's, so the difference is visible: with the stdlib the work done in pools lands in
separate traces (orphans) or, in worker processes, never arrives at all; a streaming
response closed in another task leaves its ended span current (OpenTelemetry logs
"Failed to detach context"), so the next span gets the wrong parent; and the worker
processes' log lines are lost. propagate's run uses its runtime context
(``OTEL_PYTHON_CONTEXT=propagate``, set by ``__main__`` before OpenTelemetry loads),
``relay_logs=True``, and `propagate.instrument` for the pool inside a library the
request calls (as boto3's transfer manager has one), which no tool of the caller's reaches.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import propagate
import propagate.dns

tracer = trace.get_tracer("propagate.demo")
log = logging.getLogger("propagate.demo")


class _Where(SpanProcessor):
    """Labels each span with the thread and process it started on."""

    def on_start(self, span: Span, parent_context: object = None) -> None:
        span.set_attribute("thread.name", threading.current_thread().name)
        span.set_attribute("process.pid", os.getpid())


def _work(name: str, seconds: float = 0.002) -> str:
    with tracer.start_as_current_span(name):
        time.sleep(seconds)
        return name


def render(page: int) -> int:
    """Runs in a worker process, whose spans have no _Where: label them here."""
    where: dict[str, str | int] = {"thread.name": threading.current_thread().name,
                                   "process.pid": os.getpid()}
    with tracer.start_as_current_span(f"render page {page}", attributes=where):
        time.sleep(0.005)
        log.info("rendered page %d", page)  # INFO: a fresh worker's own logging drops it
        return page


def reindex() -> None:
    """The linked background job: its task span is the root of a trace of its own."""
    time.sleep(0.01)


def upload(parts: range) -> list[str]:
    """A third-party library's call: its own stdlib pool, which its caller cannot swap."""
    with cf.ThreadPoolExecutor(2, thread_name_prefix="vendor") as pool:
        return list(pool.map(_work, [f"upload part {part}" for part in parts]))


def fetch_shard(shard: int, pool: cf.Executor) -> str:
    with tracer.start_as_current_span(f"fetch shard {shard}"):
        return pool.submit(_work, f"decode shard {shard}").result()  # a nested pool


class Tools:
    """propagate's way of doing each step."""

    label = "propagate"

    def thread_pool(self, **kwargs: Any) -> cf.ThreadPoolExecutor:
        return propagate.ThreadPoolExecutor(**kwargs)

    def process_pool(self) -> cf.ProcessPoolExecutor:
        return propagate.ProcessPoolExecutor(2, relay_logs=True)

    def background_pool(self) -> cf.ThreadPoolExecutor:
        return propagate.ThreadPoolExecutor(1, thread_name_prefix="background", task_spans=True,
                                            link=True)

    async def lookup(self, host: str) -> object:
        return await propagate.dns.getaddrinfo(host, 80)

    async def to_thread(self, fn: Callable[..., str], *args: Any) -> str:
        return await propagate.to_thread(fn, *args)

    def traced(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return propagate.trace(fn)

    def traced_task(self, fn: Callable[[], None]) -> Callable[[], None]:
        return fn  # the pool's task_spans name the span after it


class StdlibTools(Tools):
    """The standard library's way: what most code does today."""

    label = "stdlib"

    def thread_pool(self, **kwargs: Any) -> cf.ThreadPoolExecutor:
        return cf.ThreadPoolExecutor(**kwargs)

    def process_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(2)

    def background_pool(self) -> cf.ThreadPoolExecutor:
        return cf.ThreadPoolExecutor(1, thread_name_prefix="background")

    def traced_task(self, fn: Callable[[], None]) -> Callable[[], None]:
        def traced() -> None:
            with tracer.start_as_current_span(fn.__qualname__):
                fn()

        return traced

    async def lookup(self, host: str) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, _resolve, host)

    async def to_thread(self, fn: Callable[..., str], *args: Any) -> str:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def traced(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def traced(*args: Any) -> Any:
            with tracer.start_as_current_span(fn.__qualname__):
                return await fn(*args)

        return traced


def _resolve(host: str) -> object:
    import socket

    with tracer.start_as_current_span("dns.lookup"):
        return socket.getaddrinfo(host, 80)


async def _call_api(i: int) -> int:
    await asyncio.sleep(0.01)
    return i


async def _rows() -> Any:
    """A streaming response body: its span is current while it streams (a plain
    OpenTelemetry scope, not propagate's)."""
    with tracer.start_as_current_span("stream rows"):
        for row in range(3):
            yield row


async def request(tools: Tools) -> cf.Future[None]:
    """One request: DNS, thread fan-out with a nested pool, processes, asyncio, background."""
    pool, inner = tools.thread_pool(max_workers=3), tools.thread_pool(max_workers=2)
    background = tools.background_pool()
    with tracer.start_as_current_span("GET /report"):
        await tools.lookup("localhost")
        list(pool.map(fetch_shard, range(3), [inner] * 3))
        with tools.process_pool() as processes:
            list(processes.map(render, range(2)))
        await tools.to_thread(_work, "parse report")
        call_api = tools.traced(_call_api)
        await asyncio.gather(*(call_api(i) for i in range(3)))
        rows = _rows()
        await rows.__anext__()  # its scope is entered here, in the request's task...
        await asyncio.create_task(rows.aclose())  # ...and exited in another (a disconnect)
        with tracer.start_as_current_span("summarize"):  # the request's child, or the stream's?
            pass
        upload(range(2))  # a library's own pool: only instrument() reaches it
        pool.submit(_work, "audit log (fire-and-forget)", 0.05)  # outlives the request
        job = background.submit(tools.traced_task(reindex))
    pool.shutdown()
    inner.shutdown()
    background.shutdown()
    return job


class _Lines(logging.Handler):
    """Keeps the demo's log records, with the span each was logged in (`ContextFilter`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(propagate.debug.ContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def run(tools: Tools) -> tuple[list[ReadableSpan], list[logging.LogRecord]]:
    """The request's spans, and the log records of the demo's logger handled here."""
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource({"service.name": "propagate-demo"}))
        trace.set_tracer_provider(provider)
    provider.add_span_processor(_Where())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    lines = _Lines()
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    instrument = not isinstance(tools, StdlibTools)
    if instrument:
        propagate.instrument()
    try:
        asyncio.run(request(tools))
    finally:
        if instrument:
            propagate.uninstrument()
        log.removeHandler(lines)
    return list(exporter.get_finished_spans()), lines.records


def log_lines(records: Sequence[logging.LogRecord], spans: Sequence[ReadableSpan]) -> list[str]:
    """One line per record, naming the span it was logged in."""
    names = {f"{s.context.span_id:016x}": s.name for s in spans if s.context is not None}
    return [f"{r.levelname} pid {r.process} in {names.get(r.otelSpanID, 'no span')!r} "  # type: ignore[attr-defined]
            f"(span {r.otelSpanID}): {r.getMessage()}" for r in records]  # type: ignore[attr-defined]


def _thread(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    return str(attrs.get("thread.name", "?"))


def _pid(span: ReadableSpan) -> Any:
    attrs = span.attributes or {}
    return attrs.get("process.pid", span.resource.attributes.get("process.pid", os.getpid()))


def tree(spans: Sequence[ReadableSpan]) -> list[str]:
    """One line per span, indented by parentage, one block per trace."""
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    children: dict[int | None, list[ReadableSpan]] = {}
    for s in sorted(spans, key=lambda s: s.start_time or 0):
        parent = s.parent.span_id if s.parent is not None else None
        children.setdefault(parent if parent in by_id else None, []).append(s)
    lines: list[str] = []

    def show(s: ReadableSpan, depth: int) -> None:
        ms = ((s.end_time or 0) - (s.start_time or 0)) / 1e6
        label = ("  " * depth + s.name).ljust(44)
        lines.append(f"{label} {ms:7.1f} ms  {_thread(s):<22} pid {_pid(s)}")
        for lk in s.links:
            target = by_id.get(lk.context.span_id)
            name = target.name if target is not None else f"{lk.context.span_id:016x}"
            lines.append("  " * (depth + 1) + f"↪ linked from {name!r}")
        for c in children.get(s.context.span_id if s.context else None, []):
            show(c, depth + 1)

    roots = children.get(None, [])
    for i, root in enumerate(roots):
        orphan = " (orphan: its parent is in another trace)" if root.parent is not None else ""
        lines.append(f"trace {root.context.trace_id:032x}{orphan}" if root.context else "trace")
        show(root, 1)
        if i < len(roots) - 1:
            lines.append("")
    return lines


def as_json(spans: Sequence[ReadableSpan]) -> str:
    return json.dumps([{
        "name": s.name,
        "trace_id": f"{s.context.trace_id:032x}" if s.context else None,
        "span_id": f"{s.context.span_id:016x}" if s.context else None,
        "parent_id": f"{s.parent.span_id:016x}" if s.parent else None,
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "thread": _thread(s),
        "pid": _pid(s),
        "links": [f"{lk.context.span_id:016x}" for lk in s.links],
        "attributes": dict(s.attributes or {}),
    } for s in spans], indent=2)


def main(stdlib: bool = False, as_json_output: bool = False) -> int:
    tools = StdlibTools() if stdlib else Tools()
    spans, records = run(tools)
    if as_json_output:
        print(as_json(spans))
        return 0
    traces = {s.context.trace_id for s in spans if s.context is not None}
    rendered = sum(1 for s in spans if s.name.startswith("render page"))
    print(f"One request, run with {tools.label}'s tools: {len(spans)} spans in "
          f"{len(traces)} traces; {rendered} of 2 spans from worker processes arrived.\n")
    print("\n".join(tree(spans)))
    print("\nLog lines of the worker processes, handled here:")
    print("\n".join(log_lines(records, spans)) or "(none arrived)")
    if not stdlib:
        print("\nCompare: python -m propagate demo --stdlib")
    return 0
