"""A peers table: the same no-op workload through the stdlib, propagate and each peer that
patches the stdlib, each in a process of its own, paired round by round.

    pip install opentelemetry-instrumentation-threading sentry-sdk logfire ddtrace

    python stress/bench_peers.py                 # threads and processes, 7 rounds
    python stress/bench_peers.py --quick         # a smoke run
    python stress/bench_peers.py --kind threads --only sentry,ddtrace --rounds 21
    python stress/bench_peers.py --json

The peers patch ``concurrent.futures`` for the whole process, so no two of them can share
one: every configuration runs in a long-lived worker process of its own (``--worker NAME
--kind KIND``: a command a line on stdin, a JSON line back), and this process drives the
rounds. In each round every configuration runs its batch once, one at a time while the
others idle (on two CPUs they would compete), in an order that rotates round by round.
A row's ratio is the median over rounds of its batch time over the stdlib's batch time
in the same round (min..max: the spread of those per-round ratios).

The workload is bench.py's: ``noop`` tasks submitted to a pool (4 threads; or 2
processes, a fresh pool each round, made and warmed outside the timing) and every result
awaited, inside a span of a recording OpenTelemetry SDK tracer provider that exports
nowhere. A peer with a tracer of its own (Sentry, ddtrace) has its own span open too, so
that it has what it carries.

Before the rounds each worker checks, in its own pool, what reaches a task: a plain
ContextVar; one registered with ``propagate.register`` (processes); the OpenTelemetry
span; the peer's own span; and (processes) whether a span the task ends reaches the
submitter's span processors. The table prints what these checks saw, never assumptions.

``instrument`` is propagate too, as ``propagate.instrument()`` sets it up: the stdlib's own
pools, patched for the whole process. Each peer is set up as its docs say, sending nothing
anywhere: OpenTelemetry's ``ThreadingInstrumentor().instrument()``; ``sentry_sdk.init``
without a DSN, with ``ThreadingIntegration(propagate_scope=True)`` and
``traces_sample_rate=1.0``;
``logfire.configure(send_to_logfire=False, console=False)`` (its own SDK tracer
provider is then the global one, as for its users); ``ddtrace.patch(futures=True)`` with
telemetry, remote configuration and the crash tracker off, the agent at a Unix socket
that does not exist, and a trace filter that drops every trace. Every worker also
refuses, and counts, any connection to an IP address and any DNS lookup it makes from
Python (the "net" column). ddtrace's writer is native, out of that column's sight: under
strace it tried only the dead socket, twice at startup. A slow row is a report, never
a failure: the exit status is non-zero only if a task returned a wrong value or a worker
crashed or stalled.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {"threads": ("stdlib", "propagate", "instrument", "otel-threading", "sentry",
                       "logfire", "ddtrace"),
           "processes": ("stdlib", "propagate", "instrument", "logfire")}  # what patches it
DISTS = {"propagate": "propagate", "instrument": "propagate",
         "otel-threading": "opentelemetry-instrumentation-threading",
         "sentry": "sentry-sdk", "logfire": "logfire", "ddtrace": "ddtrace"}
THREADS, PROCESSES = 4, 2  # bench.py's pool sizes
STALL = 300.0  # seconds without a reply from a worker: it hangs
NET: list[str] = []  # this worker's refused connections and lookups

PLAIN: ContextVar[str | None] = ContextVar("bench_peers.plain", default=None)
REGISTERED: ContextVar[str | None] = ContextVar("bench_peers.registered", default=None)


def noop() -> None:
    return None


# -- the worker: one configuration, one kind of pool ---------------------------------------


def no_own_span() -> int | None:
    return None


@dataclass
class Peer:
    """A configuration as set up in its worker: its pool, and its own span if it has one."""

    version: str
    pool: Callable[[], cf.Executor]
    own_span: Callable[[], Any] = contextlib.nullcontext
    own_id: Callable[[], int | None] = no_own_span
    recorder: Any = None


OWN_ID: Callable[[], int | None] = no_own_span  # the peer's, for `probe`: set by `serve`


def probe() -> dict[str, Any]:
    """What a task sees, for its submitter to compare with what it had."""
    from opentelemetry import trace

    seen = trace.get_current_span().get_span_context()
    with trace.get_tracer("bench_peers").start_as_current_span("peers-task"):
        pass  # does it reach the submitter's span processors?
    return {"plain": PLAIN.get(), "registered": REGISTERED.get(), "trace_id": seen.trace_id,
            "span_id": seen.span_id, "own": OWN_ID()}


def refuse_network() -> None:
    """Refuse and count every connection to an IP address and every DNS lookup, from Python.

    The peers are set up to send nothing; this makes sure of it, and shows any attempt.
    """
    import socket

    def guarded(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(sock: socket.socket, address: Any, *rest: Any) -> Any:
            if sock.family in (socket.AF_INET, socket.AF_INET6):  # not multiprocessing's own
                NET.append(f"{original.__name__} {address!r}")
                raise ConnectionRefusedError(f"bench_peers refuses {address!r}")
            return original(sock, address, *rest)

        return call

    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        NET.append(f"getaddrinfo {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, f"bench_peers refuses to look up {host!r}")

    for name in ("connect", "connect_ex"):
        setattr(socket.socket, name, guarded(getattr(socket.socket, name)))
    socket.getaddrinfo = lookup


def recording_provider() -> Any:
    """bench.py's tracer provider (recording, exporting nowhere), and a recorder of its spans."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider, recorder = TracerProvider(), recorder_processor()
    provider.add_span_processor(recorder)
    trace.set_tracer_provider(provider)
    return recorder


def recorder_processor() -> Any:
    """Keeps the names of the spans that end in this process: did a task's come home?"""
    from opentelemetry.sdk.trace import SpanProcessor

    class Recorder(SpanProcessor):
        def __init__(self) -> None:
            self.names: list[str] = []

        def on_end(self, span: Any) -> None:
            self.names.append(span.name)

    return Recorder()


def stdlib_pool(kind: str) -> Callable[[], cf.Executor]:
    """The stdlib's pools, patched or not: the class is looked up when the pool is made."""
    if kind == "threads":
        return lambda: cf.ThreadPoolExecutor(THREADS)
    return lambda: cf.ProcessPoolExecutor(PROCESSES)


def setup_stdlib(kind: str) -> Peer:
    return Peer(sys.version.split()[0], stdlib_pool(kind), recorder=recording_provider())


def setup_propagate(kind: str) -> Peer:
    import propagate

    recorder = recording_provider()
    propagate.register(REGISTERED)
    if kind == "threads":
        return Peer(propagate.__version__, lambda: propagate.ThreadPoolExecutor(THREADS),
                    recorder=recorder)
    return Peer(propagate.__version__, lambda: propagate.ProcessPoolExecutor(PROCESSES),
                recorder=recorder)


def setup_instrument(kind: str) -> Peer:
    """``propagate.instrument()``: the stdlib's own pools, patched for the whole process."""
    import propagate

    recorder = recording_provider()
    propagate.register(REGISTERED)
    propagate.instrument()
    return Peer(propagate.__version__, stdlib_pool(kind), recorder=recorder)


def setup_otel_threading(kind: str) -> Peer:
    from opentelemetry.instrumentation.threading import ThreadingInstrumentor

    recorder = recording_provider()
    ThreadingInstrumentor().instrument()
    return Peer(version(DISTS["otel-threading"]), stdlib_pool(kind), recorder=recorder)


def setup_sentry(kind: str) -> Peer:
    """No DSN: no transport, so events and transactions are dropped in the process."""
    import sentry_sdk
    from sentry_sdk.integrations.threading import ThreadingIntegration

    recorder = recording_provider()
    sentry_sdk.init(dsn=None, integrations=[ThreadingIntegration(propagate_scope=True)],
                    traces_sample_rate=1.0)

    def own_id() -> int | None:
        span = sentry_sdk.get_current_span()
        return None if span is None else int(span.span_id, 16)

    return Peer(version(DISTS["sentry"]), stdlib_pool(kind),
                lambda: sentry_sdk.start_transaction(op="bench", name="bench"), own_id,
                recorder)


def setup_logfire(kind: str) -> Peer:
    """Logfire's own SDK provider becomes the global one, as for its users. The recorder is
    added to it afterwards, not through ``configure``: a process pool's every ``submit``
    pickles Logfire's configuration for the worker, and the recorder is no part of that."""
    import logfire
    from opentelemetry import trace

    logfire.configure(send_to_logfire=False, console=False)
    recorder = recorder_processor()
    trace.get_tracer_provider().add_span_processor(recorder)  # type: ignore[attr-defined]
    return Peer(version(DISTS["logfire"]), stdlib_pool(kind), recorder=recorder)


DDTRACE_QUIET = {  # set before ddtrace is imported: what would talk to an agent or to Datadog
    "DD_INSTRUMENTATION_TELEMETRY_ENABLED": "false",
    "DD_REMOTE_CONFIGURATION_ENABLED": "false",
    "DD_CRASHTRACKING_ENABLED": "false",
    "DD_TRACE_STARTUP_LOGS": "false",
    "DD_TRACE_AGENT_URL": "unix:///nonexistent/bench-peers-dd.sock",
    "DD_DOGSTATSD_URL": "unix:///nonexistent/bench-peers-dsd.sock",
}


def setup_ddtrace(kind: str) -> Peer:
    """The tracer stays enabled (a disabled one is not what users run); every finished trace
    is dropped before the writer, and the agent's address leads nowhere."""
    for name, value in DDTRACE_QUIET.items():
        os.environ.setdefault(name, value)
    import ddtrace
    from ddtrace.trace import TraceFilter, tracer

    class DropAll(TraceFilter):
        def process_trace(self, trace: Any) -> None:
            return None

    recorder = recording_provider()
    ddtrace.patch(futures=True)
    tracer.configure(trace_processors=[DropAll()])

    def own_id() -> int | None:
        context = tracer.current_trace_context()
        return None if context is None else context.span_id

    return Peer(version(DISTS["ddtrace"]), stdlib_pool(kind), lambda: tracer.trace("bench"),
                own_id, recorder)


SETUPS: dict[str, Callable[[str], Peer]] = {
    "stdlib": setup_stdlib, "propagate": setup_propagate, "instrument": setup_instrument,
    "otel-threading": setup_otel_threading, "sentry": setup_sentry,
    "logfire": setup_logfire, "ddtrace": setup_ddtrace}


def version(dist: str) -> str:
    from importlib.metadata import version as installed

    return installed(dist)


def warm(pool: cf.Executor, kind: str) -> None:
    """Start every worker of the pool, outside any span: a worker started by a submit inside
    one could keep that submitter's context (a forked process, a patched ``Thread.start``),
    which a check would take for carried."""
    if kind == "threads":
        barrier = threading.Barrier(THREADS)  # all four at once: four threads
        futures = [pool.submit(barrier.wait, 60) for _ in range(THREADS)]
    else:
        futures = [pool.submit(noop) for _ in range(4 * PROCESSES)]
    for f in futures:
        f.result(timeout=STALL)


def batch(pool: cf.Executor, n: int) -> float:
    """bench.py's `through`: n no-op tasks, every result awaited; checked after the clock."""
    start = time.perf_counter()
    futures = [pool.submit(noop) for _ in range(n)]
    results = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    wrong = sum(r is not None for r in results)
    if wrong or len(results) != n:
        raise SystemExit(f"{wrong} of {len(results)} no-op tasks returned a wrong value")
    return seconds


def check(peer: Peer, kind: str) -> dict[str, str]:
    """What this configuration's pool carries into a task, as seen there: "yes" or "no"."""
    from opentelemetry import trace

    with peer.pool() as pool:
        warm(pool, kind)
        plain, registered = PLAIN.set(f"plain-{os.getpid()}"), REGISTERED.set("registered")
        try:
            with trace.get_tracer("bench_peers").start_as_current_span("peers-check") as span, \
                    peer.own_span():
                mine, own = span.get_span_context(), peer.own_id()
                seen = pool.submit(probe).result(timeout=STALL)
        finally:
            PLAIN.reset(plain)
            REGISTERED.reset(registered)
    # the pool is shut down: whatever was to come home has come
    facts = {"ContextVar": seen["plain"] == f"plain-{os.getpid()}",
             "OTel span": (seen["trace_id"], seen["span_id"]) == (mine.trace_id, mine.span_id)}
    if kind == "processes":
        facts["registered"] = seen["registered"] == "registered"
        facts["spans home"] = "peers-task" in peer.recorder.names
    facts = {k: "yes" if v else "no" for k, v in facts.items()}
    facts["own span"] = "-" if own is None else "yes" if seen["own"] == own else "no"
    return facts


def worker(name: str, kind: str, tasks: int) -> int:
    """Set up, check, then run a batch per "run" line until "quit"; a JSON line per reply."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what a peer prints goes to stderr, not into the channel
    with channel:
        return serve(channel, name, kind, tasks)


def serve(channel: Any, name: str, kind: str, tasks: int) -> int:
    global OWN_ID

    def send(**reply: Any) -> None:
        channel.write(json.dumps({**reply, "net": NET[:5], "net_count": len(NET)}) + "\n")

    refuse_network()
    try:
        peer = SETUPS[name](kind)
    except ImportError as e:
        send(installed=False, reason=str(e))
        return 0
    OWN_ID = peer.own_id
    carries = check(peer, kind)
    with contextlib.ExitStack() as stack:
        from opentelemetry import trace

        pool = None if kind == "processes" else stack.enter_context(peer.pool())
        if pool is not None:
            warm(pool, kind)  # outside the span, like the check's
        stack.enter_context(trace.get_tracer("bench").start_as_current_span("bench"))
        stack.enter_context(peer.own_span())

        def run(n: int) -> float:
            if pool is not None:
                return batch(pool, n)
            with peer.pool() as fresh:  # bench.py's `fresh`: made and warmed off the clock
                warm(fresh, kind)
                return batch(fresh, n)

        run(max(1, tasks // 10))  # warm up: imports, caches, the relay
        send(installed=True, version=peer.version, carries=carries)
        for line in iter(sys.stdin.readline, ""):
            if line.strip() == "quit":
                break
            send(seconds=run(tasks))
    return 0


# -- the parent: one worker per configuration, rounds taking turns -------------------------


class WorkerFailed(Exception):
    pass


class Worker:
    """A configuration's process, asked one line at a time."""

    def __init__(self, name: str, kind: str, tasks: int) -> None:
        self.name, self.said = name, ""
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by `close`)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", name, "--kind", kind,
             "--tasks", str(tasks)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            bufsize=1)

    def ask(self, command: str | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline() if self.replies() else ""
        except OSError:  # its stdin closed: it died
            line = ""
        if not line:
            self.close(kill=True)
            raise WorkerFailed(f"{self.name}: the worker crashed or stalled "
                               f"(exit {self.proc.returncode}):\n{self.said}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def replies(self) -> bool:
        """Wait for its reply, while it lives, for up to STALL seconds.

        Not until EOF: a dead worker's forked pool processes may hold its stdout open.
        """
        deadline = time.monotonic() + STALL
        while time.monotonic() < deadline:
            if select.select([self.proc.stdout], [], [], 1.0)[0]:
                return True
            if self.proc.poll() is not None:
                return False
        return False

    def close(self, kill: bool = False) -> None:
        """Ask it to quit (or kill it), wait, and keep the end of what it wrote to stderr."""
        if self.stderr.closed:
            return
        if kill and self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(OSError):
            self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.seek(0)
        self.said = self.stderr.read()[-3000:]
        self.stderr.close()


def bench(kind: str, names: list[str], rounds: int, tasks: int) -> dict[str, dict[str, Any]]:
    """One row per configuration: its ready reply, and its times by round."""
    workers = {name: Worker(name, kind, tasks) for name in names}
    rows: dict[str, dict[str, Any]] = {}
    try:
        for name, w in list(workers.items()):  # they start in parallel, off the clock
            try:
                rows[name] = {**w.ask(), "times": {}}
            except WorkerFailed as e:
                rows[name] = {"failed": str(e)}
            if not rows[name].get("installed"):
                workers.pop(name).close(kill="failed" in rows[name])
        for i in range(rounds):
            turn = list(workers)
            for name in turn[i % len(turn):] + turn[:i % len(turn)]:
                try:
                    reply = workers[name].ask("run")
                except WorkerFailed as e:
                    rows[name]["failed"] = str(e)
                    workers.pop(name)
                    continue
                rows[name]["times"][i] = reply["seconds"]
                rows[name].update(net=reply["net"], net_count=reply["net_count"])
            if "stdlib" not in workers:
                break
    finally:
        for w in workers.values():
            w.close()
    return summarize(rows, tasks)


def summarize(rows: dict[str, dict[str, Any]], tasks: int) -> dict[str, dict[str, Any]]:
    """Medians per task, and the per-round ratios to the stdlib of the same round."""
    base = rows.get("stdlib", {}).get("times", {})
    for row in rows.values():
        times = row.pop("times", {})
        ratios = [t / base[i] for i, t in times.items() if i in base]
        if times:
            row["us_per_task"] = statistics.median(times.values()) * 1e6 / tasks
        if ratios:
            row.update(ratio=statistics.median(ratios), ratio_min=min(ratios),
                       ratio_max=max(ratios), rounds=len(ratios))
    return rows


COLUMNS = {"threads": ("ContextVar", "OTel span", "own span"),
           "processes": ("ContextVar", "registered", "OTel span", "own span", "spans home")}


def table(kind: str, rows: dict[str, dict[str, Any]]) -> str:
    cols = COLUMNS[kind]
    lines = [f"{kind:<15} {'version':<11} {'us/task':>8} {'ratio':>6} {'min..max':>12}  "
             + "  ".join(f"{c:<10}" for c in cols) + "  net"]
    for name, r in rows.items():
        if "failed" in r:
            lines.append(f"{name:<15} FAILED: {r['failed'].splitlines()[0]}")
        elif not r.get("installed"):
            lines.append(f"{name:<15} not installed")
        else:
            spread = "" if name == "stdlib" else f"{r['ratio_min']:.2f}..{r['ratio_max']:.2f}"
            facts = "  ".join(f"{r['carries'].get(c, '-'):<10}" for c in cols)
            net = r.get("net_count", 0)
            lines.append(f"{name:<15} {r['version']:<11} {r['us_per_task']:>8.2f} "
                         f"{r['ratio']:>6.2f} {spread:>12}  {facts}  {net or 'none'}")
    return "\n".join(lines)


LEGEND = """\
ratio: the median over rounds of the row's batch time / the stdlib's in the same round
(min..max: the per-round ratios' spread). What reaches a task, as checked in each worker's
own pool: ContextVar, a plain (unregistered) one; registered, one passed to
propagate.register; OTel span, the submitter's current span (trace and span id); own span,
the peer's own tracer's current span (Sentry's transaction, ddtrace's span; "-": none);
spans home, a span ended in the task reaches the submitting process's span processors.
net: connections to IP addresses and DNS lookups refused in the worker ("none": none tried)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 200 tasks")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (7; 3 with --quick)")
    parser.add_argument("--tasks", type=int, default=0,
                        help="tasks per batch (2000, as bench.py; 200 with --quick)")
    parser.add_argument("--kind", choices=("threads", "processes", "both"), default="both")
    parser.add_argument("--only", default="",
                        help="comma-separated configurations (the stdlib always runs): "
                             + ", ".join(CONFIGS["threads"]))
    parser.add_argument("--worker", choices=list(SETUPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    tasks = args.tasks or (200 if args.quick else 2000)
    kinds = ["threads", "processes"] if args.kind == "both" else [args.kind]
    if args.worker:
        # As the module, not as __main__: its tasks pickle by reference in every pool.
        import bench_peers  # type: ignore[import-not-found]

        return int(bench_peers.worker(args.worker, kinds[0], tasks))
    only = {c for c in args.only.split(",") if c}
    if only - set(SETUPS):
        parser.error(f"unknown configurations: {', '.join(sorted(only - set(SETUPS)))}")
    results = {kind: bench(kind, [c for c in CONFIGS[kind]
                                  if not only or c == "stdlib" or c in only], rounds, tasks)
               for kind in kinds}
    failed = [f"{kind}/{name}: {r['failed']}" for kind, rows in results.items()
              for name, r in rows.items() if "failed" in r]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for kind, rows in results.items():
            print(table(kind, rows) + "\n")
        print(LEGEND)
        print(f"{rounds} rounds of {tasks} no-op tasks, one configuration at a time, the order "
              f"rotating; a pool of {THREADS} threads, or {PROCESSES} processes (a fresh pool "
              f"each round, start method {default_start()}); a span current. Python "
              f"{sys.version.split()[0]}, {os.cpu_count()} CPUs.")
        for kind, rows in results.items():
            for name, r in rows.items():
                if r.get("net"):
                    print(f"{kind}/{name} net: {'; '.join(r['net'])}")
    for failure in failed:
        print(f"\nFAILED {failure}", file=sys.stderr)
    return 1 if failed else 0


def default_start() -> str:
    import multiprocessing

    return str(multiprocessing.get_start_method(allow_none=False))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a worker's own failure: its traceback goes to the parent's tail
        traceback.print_exc()
        sys.exit(1)
