"""Threads under load: pools, raw threads, timers, nested pools, fire-and-forget tasks.

Many submitter threads, each going through requests of its own (a span, baggage, a
registered and an unregistered ContextVar, all carrying a request id), hand work to
shared pools; every task checks it sees exactly its submitter's context.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextvars
import functools
import pickle
import random
import threading

import pytest
from conftest import Run
from workload import (
    CHILD,
    LINKED,
    PLAIN,
    Expected,
    Tally,
    attached_task,
    check,
    intact,
    join,
    mapped,
    request,
    resolve,
    settle,
    submitters,
    thread_task,
    thread_then_thread,
    until,
)

import propagate

SUBMITTERS = 8


def _record(tally: Tally, where: str, holder: list[Expected]) -> None:
    tally.add(check(holder[0], where))


class CheckingThread(propagate.Thread):
    """A subclass overriding ``run``, as the docs allow."""

    def __init__(self, tally: Tally, holder: list[Expected]) -> None:
        super().__init__(name="stress-subclass")
        self.tally, self.holder = tally, holder

    def run(self) -> None:
        _record(self.tally, "Thread subclass", self.holder)


@pytest.mark.stress(rounds=2)
def test_thread_pools(run: Run) -> None:
    """I1, I2, I3, I4: pool tasks (plain, task spans, links) see their submitter's context."""
    requests = run.size(quick=1200, long=3500)
    plain = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-plain")
    child = propagate.ThreadPoolExecutor(3, thread_name_prefix="stress-child", task_spans=True)
    linked = propagate.ThreadPoolExecutor(2, thread_name_prefix="stress-linked",
                                          task_spans=True, link=True)
    stdlib = cf.ThreadPoolExecutor(3, thread_name_prefix="stress-wrapped")
    wrapped = propagate.wrap_executor(stdlib)
    pools: list[tuple[cf.Executor, str]] = [(plain, PLAIN), (child, CHILD), (linked, LINKED),
                                            (wrapped, PLAIN)]
    expected = [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        later: list[cf.Future[object]] = []
        for i in range(requests):
            with request(f"pool-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                pool, mode = rng.choice(pools)
                task = exp.through(mode, None if mode == PLAIN else "thread_task")
                k = rng.randint(1, 16)
                if rng.random() < 0.2:  # map goes through submit
                    mapped(pool, thread_task, [task] * k, run.tally, "pool map")
                    futures = []
                else:
                    futures = [pool.submit(thread_task, task) for _ in range(k)]
                if rng.random() < 0.5:  # settle in the request...
                    settle(futures, run.tally, "pool")
                else:  # ...or after its span has ended (I3)
                    later.extend(futures)
                run.tally.add(intact(exp, "pool submitter"))
            expected[index] += k + 1
            if len(later) > 256:
                settle(later, run.tally, "pool (after the request)")
                later.clear()
        settle(later, run.tally, "pool (after the request)")

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
    finally:
        for pool in (plain, child, linked, wrapped):
            pool.shutdown(wait=True)
    run.verify(tasks=sum(expected))


@pytest.mark.stress(rounds=2)
def test_raw_threads_and_timers(run: Run) -> None:
    """I1, I2: propagate.Thread, its subclasses, Timer and wrap() run in the context of start()."""
    requests = run.size(quick=400, long=4000)
    expected = [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        started: list[threading.Thread] = []
        for i in range(requests):
            holder: list[Expected] = []  # filled in the request: made before, started in it
            kind = rng.choice(("thread", "subclass", "timer", "wrap"))
            thread: threading.Thread
            if kind == "thread":
                thread = propagate.Thread(target=_record, args=(run.tally, "Thread", holder))
            elif kind == "subclass":
                thread = CheckingThread(run.tally, holder)
            elif kind == "timer":
                thread = propagate.Timer(rng.uniform(0, 0.002), _record,
                                         args=(run.tally, "Timer", holder))
            with request(f"raw-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                holder.append(exp)
                if kind == "wrap":
                    thread = threading.Thread(target=propagate.wrap(
                        functools.partial(_record, run.tally, "wrap", holder)))
                thread.start()
                if rng.random() < 0.5:
                    join([thread], run.tally, f"{kind} joined in its request")
                else:  # it may outlive the request (I3)
                    started.append(thread)
                run.tally.add(intact(exp, "thread starter"))
            expected[index] += 2
        join(started, run.tally, "threads started earlier")

    submitters(SUBMITTERS, run.seed, body, run.tally)
    run.verify(tasks=sum(expected))


@pytest.mark.stress(rounds=2)
def test_nested_thread_pools(run: Run) -> None:
    """I1, I2: a task that opens its own request and submits to another pool hands on its own."""
    requests = run.size(quick=600, long=1500)
    outer = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-outer")
    inner = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-inner")
    expected = [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        for i in range(requests):
            with request(f"nest-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                k = rng.randint(1, 8)
                futures = [outer.submit(thread_then_thread, exp, inner) for _ in range(k)]
                settle(futures, run.tally, "nested pools")
                run.tally.add(intact(exp, "nested submitter"))
            expected[index] += 3 * k + 1

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
    finally:
        outer.shutdown(wait=True)
        inner.shutdown(wait=True)
    run.verify(tasks=sum(expected))


@pytest.mark.stress(rounds=2)
def test_detached_contexts(run: Run) -> None:
    """I1, I2: capture() in a request, attach() in a stdlib thread in an empty Context."""
    requests = run.size(quick=500, long=2500)
    stdlib = cf.ThreadPoolExecutor(4, thread_name_prefix="stress-detached")
    expected = [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        for i in range(requests):
            with request(f"detached-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                detached = propagate.capture()
                if rng.random() < 0.5:
                    detached = pickle.loads(pickle.dumps(detached))
                k = rng.randint(1, 16)
                futures = [stdlib.submit(contextvars.Context().run, attached_task, detached,
                                         exp.through(process=True)) for _ in range(k)]
                settle(futures, run.tally, "detached")
                run.tally.add(intact(exp, "capturing submitter"))
            expected[index] += k + 1

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
    finally:
        stdlib.shutdown(wait=True)
    run.verify(tasks=sum(expected))


@pytest.mark.stress(rounds=2)
def test_fire_and_forget(run: Run) -> None:
    """I3: tasks and timers that run after their submitter's span ended and its thread exited."""
    rounds = run.size(quick=100, long=300)
    workers = 4
    pool = propagate.ThreadPoolExecutor(workers, thread_name_prefix="stress-forgotten")
    expected = 0
    try:
        for r in range(rounds):
            gate = threading.Event()
            blockers = [pool.submit(until, gate.wait) for _ in range(workers)]  # all busy
            futures: list[cf.Future[object]] = []
            timers: list[threading.Thread] = []
            lock = threading.Lock()
            counts = [0] * SUBMITTERS

            def body(index: int, rng: random.Random, r: int = r, gate: threading.Event = gate,
                     futures: list[cf.Future[object]] = futures,
                     timers: list[threading.Thread] = timers, counts: list[int] = counts,
                     lock: threading.Lock = lock) -> None:
                for i in range(rng.randint(1, 10)):
                    with request(f"forgotten-{r}-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                        queued = [pool.submit(thread_task, exp) for _ in range(rng.randint(1, 8))]
                        timer = propagate.Timer(rng.uniform(0, 0.005), _wait_and_record,
                                                args=(gate, run.tally, [exp]))
                        timer.start()
                        run.tally.add(intact(exp, "forgetful submitter"))
                    with lock:
                        futures.extend(queued)
                        timers.append(timer)
                    counts[index] += len(queued) + 2
                # returns: its spans have ended and its thread exits before the tasks run

            submitters(SUBMITTERS, run.seed + r, body, run.tally)
            gate.set()
            resolve(blockers, run.tally, "fire-and-forget blockers")
            settle(futures, run.tally, "fire-and-forget")
            join(timers, run.tally, "fire-and-forget timers")
            expected += sum(counts)
    finally:
        pool.shutdown(wait=True)
    run.verify(tasks=expected)


def _wait_and_record(gate: threading.Event, tally: Tally, holder: list[Expected]) -> None:
    until(gate.wait)
    _record(tally, "Timer (fire-and-forget)", holder)
