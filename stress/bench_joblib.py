"""joblib's loky backend with and without propagate, on no-op tasks, in one alternating run.

A: ``Parallel(backend="loky")``; B: ``Parallel(backend="propagate-loky")``. Both run on
the same two loky worker processes: joblib keeps one reusable loky executor for every call
that asks for the same workers, whichever backend class makes the call. Each round is one
``Parallel`` call, as a user makes it, inside one span, so B carries a trace identity and
has the relay on. Rounds alternate which goes first, so both see the same machine noise.

Two rows: joblib's own batching (``batch_size="auto"``: no-op tasks go in big batches)
and ``batch_size=1``, where every task is a batch of its own and propagate's cost per
batch shows most. Target: median ratio B/A at most 1.10.

    python stress/bench_joblib.py
    python stress/bench_joblib.py --rounds 81 --tasks 4000
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from joblib import Parallel, delayed
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from paired import Timed, paired  # type: ignore[import-not-found]

import propagate.joblib

WORKERS = 2


def _calls(backend: str, batch_size: int | str) -> Timed:
    def run(n: int) -> float:
        start = time.perf_counter()
        Parallel(n_jobs=WORKERS, backend=backend, batch_size=batch_size)(
            delayed(operator.neg)(i) for i in range(n))
        return time.perf_counter() - start

    return run


def bench(rounds: int = 41, tasks: int = 2000) -> dict[str, Any]:
    """Per-task medians of A (loky) and B (propagate-loky), in microseconds, and B/A."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())  # recording, exporting nowhere: relay on
    propagate.joblib.register()
    rows = {}
    with trace.get_tracer("bench").start_as_current_span("bench"):
        for batch_size, n in (("auto", tasks), (1, max(1, tasks // 2))):
            rows[f"batch_size={batch_size}"] = paired(
                _calls("loky", batch_size), _calls("propagate-loky", batch_size), rounds, n)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--tasks", type=int, default=2000)
    options = parser.parse_args()
    print(json.dumps(bench(options.rounds, options.tasks), indent=2))
