"""Processes under load: pools under each start method, and pools nested across kinds.

Tasks cross as detached contexts: the trace identity, baggage and the registered
variable cross; the unregistered one must not (it keeps the worker's own, unset, value).
Spans the workers record come home through the relay, each exactly once (I6): the
session's span processor counts them by name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import multiprocessing
import random
import threading

import pytest
from conftest import SCALE, Run
from workload import (
    CHILD,
    LOGS,
    PLAIN,
    intact,
    log_lines,
    mapped,
    request,
    run_async,
    settle,
    submitters,
    thread_task,
    thread_then_process,
    watched,
)

import propagate
from propagate.debug import ContextFilter

SUBMITTERS = 4


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """fork and spawn always; forkserver too in the long suite."""
    if "method" in metafunc.fixturenames:
        wanted = ["fork", "spawn"]
        if metafunc.config.stash[SCALE] == "long":
            wanted.append("forkserver")
        available = multiprocessing.get_all_start_methods()
        metafunc.parametrize("method", [m for m in wanted if m in available])


@pytest.mark.stress(rounds=2)
def test_process_pools(run: Run, method: str) -> None:
    """I1, I6: process tasks see their submitter's detached context; their spans come home once."""
    requests = run.size(quick=120, long=600)
    context = multiprocessing.get_context(method)
    plain = propagate.ProcessPoolExecutor(2, mp_context=context)
    child = propagate.ProcessPoolExecutor(2, mp_context=context, task_spans=True)
    wrapped = propagate.wrap_executor(cf.ProcessPoolExecutor(2, mp_context=context))
    pools: list[tuple[cf.Executor, str]] = [(plain, PLAIN), (child, CHILD), (wrapped, PLAIN)]
    expected, task_spans = [0] * SUBMITTERS, [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        for i in range(requests):
            with request(f"proc-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                pool, mode = rng.choice(pools)
                task = exp.through(mode, None if mode == PLAIN else "thread_task", process=True)
                k = rng.randint(1, 8)
                if rng.random() < 0.2:  # map goes through submit, one item per task here
                    mapped(pool, thread_task, [task] * k, run.tally, f"{method} pool map")
                else:
                    settle([pool.submit(thread_task, task) for _ in range(k)], run.tally,
                           f"{method} pool")
                run.tally.add(intact(exp, "process submitter"))
            expected[index] += k + 1
            task_spans[index] += k if mode == CHILD else 0

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
    finally:
        for pool in (plain, child, wrapped):
            pool.shutdown(wait=True)
    tasks = sum(expected) - SUBMITTERS * requests  # less the submitters' own checks
    relayed = {"stress.task": tasks, "thread_task": sum(task_spans)}
    run.verify(tasks=sum(expected), relayed={k: v for k, v in relayed.items() if v})


@pytest.mark.stress(rounds=2, jitter=False)
def test_process_map_chunks_do_not_share_context(run: Run, method: str) -> None:
    """I2: with map(chunksize > 1) each item starts clean, unchanged by the item before it."""
    requests = run.size(quick=30, long=200)
    pool = propagate.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method))
    expected = 0
    try:
        for i in range(requests):
            with request(f"chunk-{i}") as exp:
                k = run.rng.randint(2, 8)
                items = [exp.through(process=True)] * k
                mapped(pool, thread_task, items, run.tally, f"{method} map", chunksize=k)
            expected += k
    finally:
        pool.shutdown(wait=True)
    run.verify(tasks=expected)


@pytest.mark.stress(rounds=2)
def test_thread_to_process_to_thread(run: Run, method: str) -> None:
    """I1, I6: thread pool -> process pool -> thread in the worker, each in its own request."""
    requests = run.size(quick=80, long=400)
    outer = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-outer")
    processes = propagate.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method))
    nested = [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        for i in range(requests):
            with request(f"t2p-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                k = rng.randint(1, 6)
                futures = [outer.submit(thread_then_process, exp, processes) for _ in range(k)]
                settle(futures, run.tally, "thread -> process -> thread")
                run.tally.add(intact(exp, "nested submitter"))
            nested[index] += k

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
    finally:
        outer.shutdown(wait=True)
        processes.shutdown(wait=True)
    n = sum(nested)
    # per nested task: thread check, process check, worker-thread check, two intact checks
    run.verify(tasks=5 * n + SUBMITTERS * requests,
               relayed={"stress.task": 2 * n, "stress.request": n})


@pytest.mark.stress(rounds=2)
def test_asyncio_to_thread_to_process(run: Run, method: str) -> None:
    """I1, I6: asyncio task -> to_thread -> process pool (and asyncio -> process directly)."""
    requests = run.size(quick=400, long=2500)
    processes = propagate.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method))
    counts = {"nested": 0, "direct": 0}

    async def one(i: int, rng: random.Random, gate: asyncio.Semaphore) -> None:
        async with gate:
            with request(f"a2p-{i}", scoped=rng.random() < 0.3) as exp:
                if rng.random() < 0.7:
                    outcome = await watched(propagate.to_thread(
                        thread_then_process, exp, processes), f"{exp.request_id} (nested)")
                    counts["nested"] += 1
                else:
                    outcome = await watched(propagate.run_in_executor(
                        processes, thread_task, exp.through(process=True)), exp.request_id)
                    counts["direct"] += 1
                run.tally.add(outcome)
                run.tally.add(intact(exp, "coroutine"))

    async def main() -> None:
        propagate.install()
        gate = asyncio.Semaphore(16)
        await asyncio.gather(*(one(i, random.Random(f"{run.seed}-{i}"), gate)
                               for i in range(requests)))

    try:
        run_async(main(), run.tally, f"asyncio -> {method} pool")
    finally:
        processes.shutdown(wait=True)
    nested, direct = counts["nested"], counts["direct"]
    run.verify(tasks=6 * nested + 2 * direct,
               relayed={"stress.task": 2 * nested + direct, "stress.request": nested})


@pytest.mark.stress(rounds=2)
def test_relay_logs_once_in_order_under_their_span(run: Run, method: str) -> None:
    """I6: with relay_logs, every record of every task is handled here exactly once, a
    task's in the order logged, under the task's worker span, while submitters race."""
    requests = run.size(quick=40, long=300)
    pool = propagate.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(method),
                                         relay_logs=True)
    seen: dict[str, list[tuple[int, str]]] = {}
    lock = threading.Lock()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            prefix, number = record.getMessage().rsplit(" ", 1)
            with lock:
                seen.setdefault(prefix, []).append((int(number), record.otelSpanID))  # type: ignore[attr-defined]

    keep = Keep()
    keep.addFilter(ContextFilter())
    LOGS.addHandler(keep)
    LOGS.setLevel(logging.INFO)
    sent: dict[str, tuple[int, cf.Future[int]]] = {}

    def body(index: int, rng: random.Random) -> None:
        for i in range(requests):
            n = rng.randint(0, 12)
            prefix = f"logs-{index}-{i}"
            future = pool.submit(log_lines, prefix, n)
            with lock:
                sent[prefix] = (n, future)

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
        errors = []
        for prefix, (n, future) in sent.items():
            span_id = f"{future.result(timeout=120):016x}"
            got = seen.get(prefix, [])  # handled before the future resolved: here by now
            if got != [(i, span_id) for i in range(n)]:
                errors.append(f"{method}: {prefix}: {n} lines under {span_id}, got {got}")
        run.tally.add((len(sent), tuple(errors)))
    finally:
        pool.shutdown(wait=True)
        LOGS.removeHandler(keep)
        LOGS.setLevel(logging.NOTSET)
    run.verify(tasks=len(sent), relayed={"stress.logs": len(sent)})
