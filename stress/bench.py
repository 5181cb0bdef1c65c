"""Paired benchmarks: propagate against the stdlib (and peers), side by side in one run.

Each row alternates A and B round by round, so both see the same machine noise, and
reports the per-task median of each and the median of the per-round ratios B/A.

    python stress/bench.py            # every row, the full size
    python stress/bench.py --quick    # small, for a smoke run
    python stress/bench.py --json     # for machines
    python stress/bench.py --only threads,span
    python stress/bench.py --only processes --rounds 63   # a narrower median, slowly
    python stress/bench.py --only big   # big arguments: time and the parent's peak memory
    python stress/bench.py --only import   # import propagate against OpenTelemetry's API
    python stress/bench.py --only runtime  # OTEL_PYTHON_CONTEXT=propagate against the default
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_big import TARGETS as BIG_TARGETS  # type: ignore[import-not-found]
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from paired import Timed, paired  # type: ignore[import-not-found]

import propagate

trace.set_tracer_provider(TracerProvider())  # recording, exporting nowhere: the relay is on
tracer = trace.get_tracer("bench")

def noop() -> None:
    return None


def through(pool: cf.Executor, fn: Callable[[], Any] = noop) -> Timed:
    def run(n: int) -> float:
        start = time.perf_counter()
        futures = [pool.submit(fn) for _ in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - start

    return run


def fresh(make: Callable[[], cf.Executor], fn: Callable[[], Any] = noop) -> Timed:
    """Each round in a pool of its own, made and warmed outside the timing.

    A pool's threads and processes land where the scheduler puts them, and stay there:
    on a machine with few CPUs one pool's placement would bias a whole run, by more than
    two pools of the stdlib's own differ from each other.
    """
    def run(n: int) -> float:
        with make() as pool:
            warm = [pool.submit(fn) for _ in range(4 * WORKERS)]  # start every worker
            for f in warm:
                f.result()
            return through(pool, fn)(n)

    return run


WORKERS = 2  # per pool, in the process and interpreter rows
# Their rounds vary most: on two CPUs one round's ratio depends on how the pools' processes
# and threads happen to be scheduled. Three times the rounds narrow the median's spread
# by a factor of sqrt(3).
POOL_ROUNDS = 3


@contextmanager
def pools(*made: cf.Executor) -> Iterator[None]:
    try:
        yield
    finally:
        for pool in made:
            pool.shutdown()


def bench_threads(rounds: int, n: int) -> dict[str, dict[str, float]]:
    std, ours = cf.ThreadPoolExecutor(4), propagate.ThreadPoolExecutor(4)
    spans = propagate.ThreadPoolExecutor(4, task_spans=True)
    rows = {}
    with pools(std, ours, spans), tracer.start_as_current_span("bench"):
        rows["threads"] = paired(through(std), through(ours), rounds, n)
        rows["threads, task_spans=True"] = paired(through(std), through(spans), rounds, n)
        peer = _threading_instrumentor()
        if peer is not None:
            rows["threads, otel threading instrumentor (peer)"] = paired(
                through(std), _instrumented(peer, std), rounds, n)
    return rows


def _threading_instrumentor() -> Any:
    try:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor
    except Exception:  # not installed, or not importable with this opentelemetry
        return None
    return ThreadingInstrumentor()


def _instrumented(instrumentor: Any, pool: cf.Executor) -> Timed:
    def run(n: int) -> float:
        instrumentor.instrument()
        try:
            return through(pool)(n)
        finally:
            instrumentor.uninstrument()

    return run


def bench_processes(rounds: int, n: int) -> dict[str, dict[str, float]]:
    std = fresh(lambda: cf.ProcessPoolExecutor(WORKERS))
    relay = fresh(lambda: propagate.ProcessPoolExecutor(WORKERS))
    plain = fresh(lambda: propagate.ProcessPoolExecutor(WORKERS, relay=False))
    # what relay_logs adds to a task that logs nothing: the levels it carries, the capture
    logs = fresh(lambda: propagate.ProcessPoolExecutor(WORKERS, relay_logs=True))
    rounds *= POOL_ROUNDS
    with tracer.start_as_current_span("bench"):
        return {
            "processes, relay on": paired(std, relay, rounds, n),
            "processes, relay off": paired(std, plain, rounds, n),
            "processes, relay_logs on": paired(std, logs, rounds, n),
        }


def bench_interpreters(rounds: int, n: int) -> dict[str, dict[str, float]]:
    """Subinterpreter pools (3.14+); the task is a builtin, which both pools send by reference."""
    if sys.version_info < (3, 14):
        return {}
    std = fresh(lambda: cf.InterpreterPoolExecutor(WORKERS), os.getpid)
    ours = fresh(lambda: propagate.InterpreterPoolExecutor(WORKERS), os.getpid)
    with tracer.start_as_current_span("bench"):
        return {"interpreters, relay on": paired(std, ours, rounds * POOL_ROUNDS, n)}


def bench_to_thread(rounds: int, n: int) -> dict[str, dict[str, float]]:
    def timed(to_thread: Callable[..., Any]) -> Timed:
        def run(k: int) -> float:
            async def go() -> float:
                start = time.perf_counter()
                for _ in range(k // 50):
                    await asyncio.gather(*(to_thread(noop) for _ in range(50)))
                return time.perf_counter() - start

            return asyncio.run(go())

        return run

    with tracer.start_as_current_span("bench"):
        return {"to_thread": paired(timed(asyncio.to_thread), timed(propagate.to_thread),
                                    rounds, max(50, n // 50 * 50))}


def bench_span(rounds: int, n: int) -> dict[str, dict[str, float]]:
    def timed(make: Callable[[str], Any]) -> Timed:
        def run(k: int) -> float:
            start = time.perf_counter()
            for _ in range(k):
                with make("s"):
                    pass
            return time.perf_counter() - start

        return run

    return {"span": paired(timed(tracer.start_as_current_span), timed(propagate.span),
                           rounds, n * 5)}


def bench_runtime(rounds: int, n: int) -> dict[str, dict[str, float]]:
    """OpenTelemetry's context API with its default runtime context against propagate's
    (``OTEL_PYTHON_CONTEXT=propagate``), swapped in turn in this one process, as the entry
    point would install it. Three rows:

    * the API alone: an attach, a ``get_current`` and a detach (the target's row);
    * the same with propagate's runtime minus its one piece of bookkeeping, the context
      each token set (``attach`` returns the bare Token): what that bookkeeping costs.
      Such a runtime cannot heal correctly, so this row is a floor, not an option;
    * a span scope as instrumentations open it (``start_as_current_span``, recording
      SDK), with ``get_current_span`` inside: what the runtime costs where it is used.
    """
    import opentelemetry.context as api
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    from propagate._runtime import RuntimeContext

    class BareTokens(RuntimeContext):
        def attach(self, context: api.Context) -> Any:  # type: ignore[override]
            return self._set(context)

        def detach(self, token: Any) -> None:
            try:  # noqa: SIM105 (as the runtime's own: contextlib.suppress costs two frames)
                self._reset(token)
            except ValueError:
                pass

    def swapped(runtime: Any, body: Callable[[int], float]) -> Timed:
        def run(k: int) -> float:
            before, api._RUNTIME_CONTEXT = api._RUNTIME_CONTEXT, runtime
            try:
                return body(k)
            finally:
                api._RUNTIME_CONTEXT = before

        return run

    context = api.Context({"k": "v"})

    def context_api(k: int) -> float:
        attach, get_current, detach = api.attach, api.get_current, api.detach
        start = time.perf_counter()
        for _ in range(k):
            token = attach(context)
            get_current()
            detach(token)
        return time.perf_counter() - start

    def span_scope(k: int) -> float:
        scope, current = tracer.start_as_current_span, trace.get_current_span
        start = time.perf_counter()
        for _ in range(k):
            with scope("s"):
                current()
        return time.perf_counter() - start

    default, ours = ContextVarsRuntimeContext(), RuntimeContext()
    return {
        "runtime context: attach, get_current, detach": paired(
            swapped(default, context_api), swapped(ours, context_api), rounds, n * 50),
        "runtime context, its floor (bare tokens)": paired(
            swapped(default, context_api), swapped(BareTokens(), context_api), rounds, n * 50),
        "runtime context: a span scope": paired(
            swapped(default, span_scope), swapped(ours, span_scope), rounds, n * 5),
    }


def bench_dns(rounds: int, n: int) -> dict[str, dict[str, float]]:
    from bench_dns import bench  # type: ignore[import-not-found]

    return {"dns": dict(bench(rounds=rounds))}


def bench_big(rounds: int, n: int) -> dict[str, dict[str, float]]:
    """Process pools with big arguments: each side of each round in a fresh process (see there)."""
    from bench_big import bench  # type: ignore[import-not-found]

    return bench(rounds=min(rounds, 9))


def bench_import(rounds: int, n: int) -> dict[str, dict[str, float]]:
    """``import propagate`` and its core (a thread pool's first use) in a fresh interpreter,
    against importing OpenTelemetry's API alone (what the core needs of it): each side a
    new ``python -c``, so the interpreter's own start is in both, and propagate's own cost
    is the difference. ``import propagate`` alone loads nothing more (tests/test_init.py)."""
    import subprocess

    here = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))}  # this checkout's propagate, as in this process

    def timed(code: str) -> Timed:
        def run(k: int) -> float:
            start = time.perf_counter()
            for _ in range(k):
                subprocess.run([sys.executable, "-c", code], check=True, env=here)
            return time.perf_counter() - start

        return run

    otel = "import opentelemetry.trace, opentelemetry.context, opentelemetry.baggage"
    core = "import propagate; propagate.ThreadPoolExecutor"
    return {"import: propagate's core (vs OpenTelemetry's API)": paired(
        timed(otel), timed(core), rounds, max(2, n // 400))}


def bench_dask(rounds: int, n: int) -> dict[str, dict[str, float]]:
    from bench_dask import bench  # type: ignore[import-not-found]

    return {"dask executor": dict(bench(rounds=rounds))}


ROWS = {"threads": bench_threads, "processes": bench_processes,
        "interpreters": bench_interpreters, "to_thread": bench_to_thread,
        "span": bench_span, "dns": bench_dns, "dask": bench_dask, "big": bench_big,
        "import": bench_import, "runtime": bench_runtime}
TARGETS = {"threads": 1.03, "processes, relay on": 1.10, "interpreters, relay on": 1.10,
           "to_thread": 1.05, "span": 1.10,
           "runtime context: attach, get_current, detach": 1.05,
           "runtime context: a span scope": 1.05,
           "dns": 1.10, "dask executor": 1.10,
           **BIG_TARGETS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, few tasks")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--only", default="", help="comma-separated rows: " + ", ".join(ROWS))
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds per row (21; 5 with --quick), for a narrower median; "
                             "the process and interpreter rows take three times as many")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    rounds, n = (5, 200) if args.quick else (21, 2000)
    rounds = args.rounds or rounds
    chosen = [r for r in args.only.split(",") if r] or list(ROWS)
    results: dict[str, dict[str, float]] = {}
    for name in chosen:
        results.update(ROWS[name](rounds, n))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'row':<46} {'A us/task':>10} {'B us/task':>10} {'B/A':>6} {'target':>7}")
    for row, r in results.items():
        target = TARGETS.get(row)
        mark = "" if target is None else f"{target:>7.2f}" + (" !" if r["ratio"] > target else "")
        if "a_mib" in r:  # a memory row: MiB, not us/task
            a, b = f"{r['a_mib']:.1f} MiB", f"{r['b_mib']:.1f} MiB"
        else:
            a, b = f"{r['a_us']:.2f}", f"{r['b_us']:.2f}"
        print(f"{row:<46} {a:>10} {b:>10} {r['ratio']:>6.3f} {mark}")
    big = ("big rows: each side of each round in a fresh process, at most 9 rounds; memory: "
           "the parent's peak RSS growth over its RSS after the argument was allocated (the "
           "argument not counted). " if "big" in chosen else "")
    print(f"\nA: the stdlib (or plain OpenTelemetry / plain Dask); B: propagate (in the peer "
          f"row, the OpenTelemetry threading instrumentor). {big}"
          f"{rounds} alternating rounds ({rounds * POOL_ROUNDS} in the process and interpreter "
          f"rows). Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
