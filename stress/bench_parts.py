"""Where a no-op task's overhead goes: the parts of propagate's detached path, one by one.

The rows of `bench.py` say how much slower a pool is; this says where it goes, for the
process and interpreter rows (a no-op task, a recording tracer provider, inside a span):

* submit: ``bind_detached`` (capture, envelope, the plain-task check; for a
  subinterpreter also the blob), warm, per call; and the objects the collector tracks
  that a pending task holds beyond the stdlib's (each one makes the parent's garbage
  collector run sooner while tasks wait);
* the wire: multiprocessing's pickle of the stdlib's call item against propagate's
  (the same function, sent through ``run_detached`` with its envelope): size, and the
  time to pickle and unpickle it, warm;
* (3.14+) in a subinterpreter: the CPU time (``time.thread_time``) of one
  ``run_detached`` of a sealed task against a bare call of the same function, measured
  inside each ``Interpreter.call`` of a stdlib interpreter pool: the first run in a call
  (what every real task pays: each call runs on a new thread state), and a second run
  in the same call;
* (3.14+) one whole call into a subinterpreter, as a pool's worker thread makes it, one
  at a time on one thread, CPU per call: the stdlib's worker running the stdlib's task,
  the stdlib's worker running propagate's task, and propagate's worker (which calls
  ``run_detached`` without the stdlib's per-argument conversion) running it.

Warm numbers are a lower bound: in a pool every part runs after the worker slept, on
cold caches. A check fails on a wrong result, never on a slow machine.

    python stress/bench_parts.py
    python stress/bench_parts.py --json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import gc
import json
import os
import statistics
import sys
import threading
import time
import timeit
from concurrent.futures.process import _CallItem
from multiprocessing.reduction import ForkingPickler
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from propagate import _context
from propagate._executor import Options, bind_detached, run_detached

PROCESSES, INTERPRETERS = Options.checked(), Options.checked(subinterpreters=True)


def warm_us(fn: Any, number: int = 20000) -> float:
    """Per call, the best of five runs: the cost with nothing else in the way."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def first_and_second(which: str, task: tuple[Any, ...]) -> tuple[float, float]:
    """In a subinterpreter: CPU us of the first and the second run within one call."""
    fn = run_detached if which == "propagate" else (lambda *_: os.getpid())
    times = []
    for _ in range(2):
        start = time.thread_time_ns()
        result = fn(*task)
        times.append((time.thread_time_ns() - start) / 1000)
        assert result == os.getpid(), result
    return times[0], times[1]


def held_per_task(bind: Any, n: int = 1000) -> float:
    """Objects the collector tracks that each of ``n`` bound tasks holds, net.

    The stdlib's pool holds ``submit``'s arguments as a tuple, the empty tuple (no object)
    for a task without arguments; propagate's holds the tuple it passes. Counted with
    ``gc.get_count()``, which counts such objects made and not yet freed.
    """
    gc.collect()
    gc.disable()
    try:
        start = gc.get_count()[0]
        held = [tuple(bind()[1]) for _ in range(n)]  # the arguments the stdlib's submit packs
        counted = gc.get_count()[0] - start - 1  # less the list holding them
        del held
        return counted / n
    finally:
        gc.enable()


def measure() -> dict[str, float]:
    rows: dict[str, float] = {}  # sizes are ints
    rows["submit: bind_detached, us"] = warm_us(lambda: bind_detached(os.getpid, (), {},
                                                                      PROCESSES))
    rows["submit: capture_fields, us"] = warm_us(_context.capture_fields)
    rows["submit: tracked objects a pending task holds"] = held_per_task(
        lambda: bind_detached(os.getpid, (), {}, PROCESSES))
    if sys.version_info >= (3, 14):  # and a subinterpreter's: the envelope pickled too
        rows["submit, subinterpreter: bind_detached, us"] = warm_us(
            lambda: bind_detached(os.getpid, (), {}, INTERPRETERS))
    _, envelope, _ = bind_detached(os.getpid, (), {}, PROCESSES)
    items = {"stdlib": _CallItem(1, os.getpid, (), {}),
             "propagate": _CallItem(1, run_detached, envelope, {})}
    for side, item in items.items():
        blob = bytes(ForkingPickler.dumps(item))
        rows[f"wire, {side}: bytes"] = len(blob)
        rows[f"wire, {side}: pickle, us"] = warm_us(functools.partial(ForkingPickler.dumps,
                                                                      item))
        rows[f"wire, {side}: unpickle, us"] = warm_us(functools.partial(ForkingPickler.loads,
                                                                        blob))
    if sys.version_info >= (3, 14):
        _, sealed, _ = bind_detached(os.getpid, (), {}, INTERPRETERS)
        assert len(sealed) == 3, "a no-op task goes sealed"  # (WIRE, version, blob)
        # by its module's name, not __main__'s: a subinterpreter would run this script
        from bench_parts import first_and_second as runs_of  # type: ignore[import-not-found]

        with cf.InterpreterPoolExecutor(2) as pool:  # type: ignore[attr-defined]
            for side in ("bare call", "propagate"):
                pool.submit(runs_of, side, sealed).result()  # imports, warm-up
                runs = [f.result() for f in [pool.submit(runs_of, side, sealed)
                                             for _ in range(2000)]]
                rows[f"subinterpreter, {side}: first run, CPU us"] = statistics.median(
                    first for first, _ in runs)
                rows[f"subinterpreter, {side}: second run, CPU us"] = statistics.median(
                    second for _, second in runs)
        rows.update(whole_calls(sealed))
    return rows


def whole_calls(sealed: tuple[Any, ...]) -> dict[str, float]:
    """CPU us per whole call into a subinterpreter, made by a pool's worker context."""
    import propagate

    sides = {"stdlib's worker, stdlib's task": (cf.InterpreterPoolExecutor,  # type: ignore[attr-defined]
                                                os.getpid, ()),
             "stdlib's worker, propagate's task": (cf.InterpreterPoolExecutor,  # type: ignore[attr-defined]
                                                   run_detached, sealed),
             "propagate's worker, propagate's task": (propagate.InterpreterPoolExecutor,
                                                      run_detached, sealed)}
    rows: dict[str, float] = {}

    def run() -> None:  # on a thread of its own, as a pool's worker
        for name, (pool, fn, args) in sides.items():
            create, resolve = pool.prepare_context(None, ())
            worker = create()
            worker.initialize()
            try:
                task = resolve(fn, args, {})
                assert worker.run(task) == os.getpid()
                per_round = []
                for _ in range(7):
                    start = time.thread_time_ns()
                    for _ in range(2000):
                        worker.run(task)
                    per_round.append((time.thread_time_ns() - start) / 2000 / 1000)
            finally:
                worker.finalize()
            rows[f"subinterpreter call, {name}: CPU us"] = statistics.median(per_round)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    trace.set_tracer_provider(TracerProvider())
    with trace.get_tracer("bench_parts").start_as_current_span("bench"):
        rows = measure()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row, value in rows.items():
        print(f"{row:<64} {value:>8}" if isinstance(value, int) else f"{row:<64} {value:>8.2f}")
    print(f"\nPython {sys.version.split()[0]}, {os.cpu_count()} CPUs; warm rows: the best of "
          "five runs; subinterpreter rows: medians of 2000 calls, or (whole calls) of 7 rounds "
          "of 2000.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
