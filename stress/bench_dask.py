"""Dask's executor with and without propagate, on small tasks, in one alternating run.

A: ``client.get_executor()``; B: ``propagate.wrap_executor(client.get_executor())``.
Both submit to the same LocalCluster (two single-threaded worker processes), inside one
span, so B carries a trace identity and has the relay on. Rounds alternate which goes
first, so both see the same machine noise. Target: median ratio B/A at most 1.10.

    python stress/bench_dask.py
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import operator
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from paired import Timed, paired  # type: ignore[import-not-found]

import propagate

_args = itertools.count()  # every task gets its own argument, so Dask never reuses a result


def _through(executor: cf.Executor) -> Timed:
    def run(n: int) -> float:
        start = time.perf_counter()
        futures = [executor.submit(operator.neg, next(_args)) for _ in range(n)]
        for future in futures:
            future.result(timeout=600)
        return time.perf_counter() - start

    return run



def bench(rounds: int = 5, tasks: int = 200) -> dict[str, Any]:
    """Per-task medians of A (plain) and B (wrapped), in microseconds, and the median ratio B/A."""
    from distributed import Client, LocalCluster

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())  # recording, exporting nowhere: relay on
    # scheduler_kwargs: the scheduler's HTTP server on any free port, not a taken 8787
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster, \
            Client(cluster) as client, \
            trace.get_tracer("bench").start_as_current_span("bench"):
        plain = client.get_executor()
        wrapped = propagate.wrap_executor(client.get_executor())
        return paired(_through(plain), _through(wrapped), rounds, tasks)


if __name__ == "__main__":
    print(json.dumps(bench(), indent=2))
