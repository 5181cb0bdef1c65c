"""Ray tasks with and without propagate, on no-op tasks, in one alternating run.

A: ``ray.remote(noop)`` tasks, each awaited through ``ObjectRef.future()``;
B: ``propagate.ray.executor().submit(noop, ...)``. Both run on the same local
Ray instance (two CPUs), inside one span, so B carries a trace identity and has the relay
on. Rounds alternate which goes first, so both see the same machine noise; a Ray task
costs most of a millisecond here, spent in several processes, so the ratio of a round
varies by several percent and many short rounds give a steadier median. Target: median
ratio B/A at most 1.10.

    PYTHONPATH=. python stress/bench_ray.py [--rounds 61] [--tasks 200]

(``PYTHONPATH=.``: the checkout's propagate, which Ray's workers import too, from the
working directory.)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from paired import Timed, paired  # type: ignore[import-not-found]

import propagate.ray


def noop(x: int) -> int:
    """The task: found by name in the workers (Ray puts this script's directory on their path)."""
    return x


def _timed(submit: Callable[[int], cf.Future[Any]]) -> Timed:
    def run(n: int) -> float:
        start = time.perf_counter()
        futures = [submit(i) for i in range(n)]
        for future in futures:
            future.result(timeout=600)
        return time.perf_counter() - start

    return run


def bench(rounds: int = 61, tasks: int = 200) -> dict[str, Any]:
    """Per-task medians of A (plain Ray) and B (propagate), in microseconds, and the ratio."""
    import ray
    from bench_ray import noop  # by its module's name, not __main__'s, as tasks usually are

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())  # recording, exporting nowhere: relay on
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with trace.get_tracer("bench").start_as_current_span("bench"):
            plain = ray.remote(noop)
            wrapped = propagate.ray.executor()
            return paired(_timed(lambda i: plain.remote(i).future()),
                          _timed(lambda i: wrapped.submit(noop, i)), rounds, tasks)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--tasks", type=int, default=200)
    options = parser.parse_args()
    print(json.dumps(bench(options.rounds, options.tasks), indent=2))
