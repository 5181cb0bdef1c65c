"""Memory: what is retained after N tasks and after 10 N tasks is the same (I5 at scale).

Each workload runs once to warm up (imports, caches, first-use allocations), then
under tracemalloc: N tasks, then 9 N more, each phase with its own pools, shut down
before the measurement, after a full collection. The memory still allocated after 10 N
tasks may exceed that after N by less than `BOUND`: nothing grows with the number of
tasks. The figures (the retained growth, the peak traced) go to the summary.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import random
import tracemalloc
import warnings
from collections.abc import Callable

import pytest
from conftest import Run
from workload import (
    CHILD,
    ENDS_ELSEWHERE,
    HARD,
    PLAIN,
    WAIT,
    Tally,
    intact,
    request,
    run_async,
    settle,
    submitters,
    thread_task,
)

import propagate

BOUND = 1024 * 1024  # bytes of retained growth allowed from N to 10 N tasks
SUBMITTERS = 4

Phase = Callable[[int, int, Tally], None]  # (tasks, seed, tally): run that many tasks


def phase_bound(tasks: int) -> float:
    """The hard bound on a whole phase (its stall bound is `WAIT`, as everywhere): the
    long phases run up to a million tasks, each several times slower under tracemalloc."""
    return HARD * WAIT * (1 + tasks // 100_000)


def threads_phase(tasks: int, seed: int, tally: Tally) -> None:
    """Submitters in requests, tasks in propagate's thread pools (plain and with task spans)."""
    plain = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-mem")
    child = propagate.ThreadPoolExecutor(2, thread_name_prefix="stress-mem-child",
                                         task_spans=True)

    def body(index: int, rng: random.Random) -> None:
        done, i = 0, 0
        while done < tasks // SUBMITTERS:
            with request(f"mem-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                pool, mode = (child, CHILD) if rng.random() < 0.3 else (plain, PLAIN)
                task = exp.through(mode, None if mode == PLAIN else "thread_task")
                k = rng.randint(1, 16)
                settle([pool.submit(thread_task, task) for _ in range(k)], tally, "memory")
                tally.add(intact(exp, "memory submitter"))
            done, i = done + k, i + 1

    try:
        submitters(SUBMITTERS, seed, body, tally, hard=phase_bound(tasks))
    finally:
        plain.shutdown(wait=True)
        child.shutdown(wait=True)


def asyncio_phase(tasks: int, seed: int, tally: Tally) -> None:
    """Coroutines in requests, awaiting propagate.to_thread on the installed default executor.

    A fixed number of coroutines share the requests: asyncio's registry of tasks keeps
    the size of its largest population, which must not be a function of N here.
    """
    async def worker(index: int, share: int) -> None:
        for i in range(share):
            with request(f"mem-aio-{index}-{i}") as exp:
                tally.add(await propagate.to_thread(thread_task, exp))
                tally.add(intact(exp, "memory coroutine"))

    async def main() -> None:
        propagate.install()
        await asyncio.gather(*(worker(i, tasks // 32) for i in range(32)))

    run_async(main(), tally, f"memory (asyncio, {tasks:,} tasks)", hard=phase_bound(tasks))


def processes_phase(tasks: int, seed: int, tally: Tally) -> None:
    """Submitters in requests, tasks in a forked propagate.ProcessPoolExecutor (relay on)."""
    pool = propagate.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))

    def body(index: int, rng: random.Random) -> None:
        done, i = 0, 0
        while done < tasks // SUBMITTERS:
            with request(f"mem-proc-{index}-{i}") as exp:
                k = rng.randint(1, 8)
                futures = [pool.submit(thread_task, exp.through(process=True)) for _ in range(k)]
                settle(futures, tally, "memory (processes)")
            done, i = done + k, i + 1

    try:
        submitters(SUBMITTERS, seed, body, tally, hard=phase_bound(tasks))
    finally:
        pool.shutdown(wait=True)


def _left_open(request_id: str) -> propagate.span:
    """A pool task that opens a scope and returns it open, to be exited elsewhere."""
    scope = propagate.span(f"stress.left-open.{request_id}", attributes={ENDS_ELSEWHERE: True})
    scope.__enter__()
    return scope


def orphans_phase(tasks: int, seed: int, tally: Tally) -> None:
    """Scopes entered in pool tasks and exited on the submitter's thread (I4, I5).

    Each is ended at its exit (its task's Context has ended), so none is kept: memory
    stays flat however many there are, and none is left for interpreter exit.
    """
    pool = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-orphans")

    def body(index: int, rng: random.Random) -> None:
        for i in range(tasks // SUBMITTERS):
            scope = pool.submit(_left_open, f"{index}-{i}").result()
            scope.__exit__(None, None, None)
            tally.add((1, ()))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", propagate.CrossThreadExitWarning)
            submitters(SUBMITTERS, seed, body, tally, hard=phase_bound(tasks))
    finally:
        pool.shutdown(wait=True)
    if propagate._span.orphans:
        tally.problem(f"{sum(map(len, propagate._span.orphans.values()))} scopes left "
                      "waiting for interpreter exit")


PHASES: dict[str, tuple[Phase, int, int]] = {  # phase, N quick, N long
    "threads": (threads_phase, 10_000, 100_000),
    "asyncio": (asyncio_phase, 3000, 20_000),
    "processes": (processes_phase, 600, 5_000),
    "orphans": (orphans_phase, 10_000, 100_000),  # quick: 100,000 exits from N to 10 N
}


@pytest.mark.stress(jitter=False)  # sleeps change no allocation; they would only cost time
@pytest.mark.parametrize("workload", sorted(PHASES))
def test_retained_memory_does_not_grow(run: Run, workload: str) -> None:
    """I5: the memory retained after 10 N tasks is no more than after N (within 1 MiB)."""
    phase, quick, long = PHASES[workload]
    n = run.size(quick, long)
    phase(max(SUBMITTERS, n // 10), run.seed, run.tally)  # warm up, untraced
    gc.collect()
    tracemalloc.start()
    try:
        phase(n, run.seed + 1, run.tally)
        after_n, first, kept = _retained()
        phase(9 * n, run.seed + 2, run.tally)
        after_10n, last, _ = _retained()
        after_10n -= kept  # the first snapshot is itself traced memory, held till now
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    growth = after_10n - after_n
    run.memory = {"n": n, "growth": growth, "after_n": after_n, "after_10n": after_10n,
                  "peak": peak}
    if growth >= BOUND:
        top = last.compare_to(first, "lineno")[:10]
        run.tally.problem(f"retained memory grew by {growth:,} bytes from {n:,} to {10 * n:,} "
                          "tasks; the largest differences:\n      "
                          + "\n      ".join(str(stat) for stat in top))
    run.verify()


def _retained() -> tuple[int, tracemalloc.Snapshot, int]:
    """Traced memory still allocated, a snapshot for the report, and what the snapshot costs."""
    gc.collect()
    retained = tracemalloc.get_traced_memory()[0]
    snapshot = tracemalloc.take_snapshot()
    return retained, snapshot, tracemalloc.get_traced_memory()[0] - retained
