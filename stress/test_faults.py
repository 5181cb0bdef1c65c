"""Faults under load: exceptions, cancellations, shutdown with work queued, killed workers,
a resolver closed with lookups in flight.

What must hold: nothing hangs (every wait is bounded, and a wait that runs out is a
stall, a failure), and nothing is silently lost: every future resolves, with a result,
the task's own exception, a cancellation we asked for, or `BrokenProcessPool` from a
dead worker. Tasks that do run still see exactly their submitter's context.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from conftest import SCALE, Run
from workload import (
    WAIT,
    CheckingLookup,
    Deadline,
    Expected,
    Stalled,
    StressError,
    Tally,
    check,
    failing_task,
    intact,
    joined,
    pending_futures,
    request,
    resolve,
    run_async,
    settle,
    slow_task,
    submitters,
    thread_task,
    unresolved,
    until,
)

import propagate
from propagate.dns import LookupTimeout, Resolver

SUBMITTERS = 4
KILL_BOUND = 30.0  # seconds without progress for BrokenProcessPool to reach every future


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Pools: threads, and processes under fork and spawn (forkserver too in the long suite)."""
    long = metafunc.config.stash[SCALE] == "long"
    methods = [m for m in ("fork", "spawn", "forkserver") if long or m != "forkserver"]
    methods = [m for m in methods if m in multiprocessing.get_all_start_methods()]
    if "kind" in metafunc.fixturenames:
        metafunc.parametrize("kind", ["threads", *methods])
    if "method" in metafunc.fixturenames:
        metafunc.parametrize("method", methods)


def make_pool(kind: str, workers: int = 2) -> cf.Executor:
    if kind == "threads":
        return propagate.ThreadPoolExecutor(workers, thread_name_prefix="stress-faults")
    return propagate.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(kind))


def expect(future: cf.Future[Any], exp: Expected, fails: bool, cancelled: bool,
           tally: Tally) -> None:
    """Tally a resolved future: its outcome, or the exception it had to raise, unchanged.

    A task's exception keeps its traceback: a thread's own, or a process's as the
    ``_RemoteTraceback`` that concurrent.futures chains to it.
    """
    if future.cancelled():
        if not cancelled:
            tally.problem(f"{exp.request_id}: a future we did not cancel was cancelled")
        return
    error = future.exception(timeout=0)
    if not fails:
        if error is not None:
            tally.problem(f"{exp.request_id}: unexpected {error!r}")
        else:
            tally.add(future.result())
        return
    if type(error) is not StressError or error.args[0] != exp.request_id:
        tally.problem(f"{exp.request_id}: want StressError({exp.request_id!r}), got {error!r}")
        return
    remote = type(error.__cause__).__name__ == "_RemoteTraceback"
    if error.__traceback__ is None and not remote:
        tally.problem(f"{exp.request_id}: the task's exception lost its traceback")
    tally.add(error.args[1])


@pytest.mark.stress(rounds=2)
def test_exceptions_and_cancellations(run: Run, kind: str) -> None:
    """I7: raised exceptions arrive unchanged, cancelled futures stay cancelled, the rest run."""
    requests = run.size(quick=1000 if kind == "threads" else 100,
                        long=4000 if kind == "threads" else 400)
    pool = make_pool(kind, 3)
    ran = [0] * SUBMITTERS

    def body(index: int, rng: random.Random) -> None:
        for i in range(requests):
            with request(f"fault-{kind}-{index}-{i}", scoped=rng.random() < 0.3) as exp:
                task = exp.through(process=kind != "threads")
                plan = [rng.random() < 0.3 for _ in range(rng.randint(1, 12))]
                futures = [pool.submit(failing_task if fails else thread_task, task)
                           for fails in plan]
                cancelled = [rng.random() < 0.3 and f.cancel() for f in futures]
                pending = resolve(futures, run.tally, exp.request_id)
                for future, fails, cancel in zip(futures, plan, cancelled, strict=False):
                    if future not in pending:
                        expect(future, task, fails, cancel, run.tally)
                run.tally.add(intact(exp, "submitter"))
            ran[index] += sum(1 for c in cancelled if not c)

    try:
        submitters(SUBMITTERS, run.seed, body, run.tally)
    finally:
        pool.shutdown(wait=True)
    relayed = None if kind == "threads" else {"stress.task": sum(ran)}
    run.verify(tasks=sum(ran) + SUBMITTERS * requests, relayed=relayed)


@pytest.mark.stress(rounds=4)
def test_shutdown_cancels_queued_work(run: Run, kind: str) -> None:
    """I7: shutdown(wait=False, cancel_futures=True) amid submits: every future still resolves."""
    rounds = run.size(quick=30 if kind == "threads" else 8,
                      long=100 if kind == "threads" else 25)
    for r in range(rounds):
        pool = make_pool(kind)
        gate = threading.Event()
        blockers = ([pool.submit(until, gate.wait) for _ in range(2)]  # both workers busy
                    if kind == "threads" else [])
        opener = threading.Timer(run.rng.uniform(0, 0.05), gate.set)  # before shutdown, or after
        opener.start()
        obtained: list[tuple[cf.Future[Any], Expected]] = []
        lock = threading.Lock()
        stopped = threading.Event()

        def body(index: int, rng: random.Random, pool: cf.Executor = pool,
                 obtained: list[tuple[cf.Future[Any], Expected]] = obtained,
                 stopped: threading.Event = stopped, lock: threading.Lock = lock,
                 r: int = r) -> None:
            for i in range(10_000):
                with request(f"shutdown-{r}-{index}-{i}") as exp:
                    task = exp.through(process=kind != "threads")
                    try:
                        future = pool.submit(slow_task, task, rng.uniform(0, 0.002))
                    except RuntimeError:  # cannot schedule new futures after shutdown
                        stopped.set()
                        return
                    with lock:
                        obtained.append((future, task))
            run.tally.problem("submitter never saw the pool shut down")

        shutter = threading.Timer(run.rng.uniform(0.005, 0.05), pool.shutdown,
                                  kwargs={"wait": False, "cancel_futures": True})
        shutter.start()
        submitters(SUBMITTERS, run.seed + r, body, run.tally)
        joined([shutter, opener])
        pending = resolve([f for f, _ in obtained] + blockers, run.tally,
                          f"round {r}: after shutdown(wait=False, cancel_futures=True)")
        for future, task in obtained:
            if future not in pending:
                expect(future, task, fails=False, cancelled=True, tally=run.tally)
        pool.shutdown(wait=True)  # join the workers, so the next round starts clean
        if not stopped.is_set():
            run.tally.problem(f"round {r}: no submitter was refused after shutdown")
    run.verify()


@pytest.mark.stress(rounds=2)
@pytest.mark.xfail(sys.version_info < (3, 12), strict=False, reason=(
    "CPython < 3.12: when a worker dies, the pool's manager thread fails pending futures "
    "without the lock submit() holds, so a concurrent submit can leave a future unresolved, "
    "shutdown() waiting, or raise OSError('handle is closed'); 3.12 takes the lock"))
def test_worker_killed_mid_task(run: Run, method: str, tmp_path: Path) -> None:
    """I7: SIGKILL a worker mid-task: every pending future gets BrokenProcessPool, in time."""
    rounds = run.size(quick=6, long=25)
    context = multiprocessing.get_context(method)
    for r in range(rounds):
        pool = propagate.ProcessPoolExecutor(2, mp_context=context)
        marker = str(tmp_path / f"started-{r}")
        obtained: list[tuple[cf.Future[Any], Expected]] = []
        lock = threading.Lock()
        try:
            with request(f"victim-{r}") as exp:
                victim = pool.submit(slow_task, exp.through(process=True), WAIT, marker)
            pid = _wait_for_marker(marker, run.tally)

            def body(index: int, rng: random.Random, pool: cf.Executor = pool,
                     obtained: list[tuple[cf.Future[Any], Expected]] = obtained,
                     lock: threading.Lock = lock, r: int = r) -> None:
                for i in range(10_000):
                    with request(f"bystander-{r}-{index}-{i}") as exp:
                        task = exp.through(process=True)
                        try:
                            future = pool.submit(slow_task, task, rng.uniform(0, 0.003))
                        except BrokenProcessPool:  # the pool has noticed: stop
                            return
                        with lock:
                            obtained.append((future, task))
                    time.sleep(rng.uniform(0, 0.001))

            killer = threading.Timer(run.rng.uniform(0.01, 0.1), _kill, args=(pid,))
            killer.start()
            submitters(SUBMITTERS, run.seed + r, body, run.tally, stall=KILL_BOUND)
            joined([killer])
            _expect_broken(pool, victim, obtained, run.tally, r)
        finally:
            _shut_down_within(pool, KILL_BOUND, run.tally, r)
        _after_the_break(context, run.tally, r)
    run.verify()


def _wait_for_marker(marker: str, tally: Tally) -> int | None:
    """The pid of the worker that runs the victim, once it has started the task."""
    deadline = Deadline()
    directory, prefix = os.path.dirname(marker), os.path.basename(marker) + "."
    while deadline.left() > 0:
        found = [n for n in os.listdir(directory) if n.startswith(prefix)]
        if found:
            return int(found[0][len(prefix):])
        time.sleep(0.005)
    tally.stall(f"the victim task never started: {deadline.why()}")
    return None


def _kill(pid: int | None) -> None:
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def _expect_broken(pool: cf.ProcessPoolExecutor, victim: cf.Future[Any],
                   obtained: list[tuple[cf.Future[Any], Expected]], tally: Tally, r: int) -> None:
    deadline = Deadline(KILL_BOUND)
    pending = unresolved([victim, *(f for f, _ in obtained)], deadline=deadline)
    if pending:
        names = {id(f): t.request_id for f, t in obtained}
        tally.stall(f"round {r}: {pending_futures(pending, len(obtained) + 1)} after a worker "
                    f"was killed; {deadline.why()}: "
                    + ", ".join(_describe(pool, f, names.get(id(f), "the victim"))
                                for f in pending))
    if victim not in pending and not isinstance(victim.exception(timeout=0), BrokenProcessPool):
        tally.problem(f"round {r}: the killed task's future has {victim.exception()!r}, "
                      f"not BrokenProcessPool")
    for future, task in obtained:
        if future in pending:
            continue
        error = future.exception(timeout=0)
        if error is None:
            tally.add(future.result())  # finished before the kill
        elif not isinstance(error, BrokenProcessPool):
            tally.problem(f"round {r}: {task.request_id}: {error!r}, not BrokenProcessPool")


def _shut_down_within(pool: cf.ProcessPoolExecutor, bound: float, tally: Tally, r: int) -> None:
    """``shutdown(wait=True)``, bounded: past the bound it is a failure, and the workers
    still alive are terminated so that it can return and the suite goes on."""
    closer = threading.Thread(target=pool.shutdown, name="stress-shutdown")
    closer.start()
    deadline = Deadline(bound)
    if not joined([closer], deadline):
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())  # diagnosis only
    alive = [f"pid {p.pid}" for p in workers if p.is_alive()]
    tally.stall(f"round {r}: shutdown() still waiting after a worker was killed; "
                f"{deadline.why()}; workers still alive: {alive or 'none'}")
    for process in workers:
        process.terminate()
    joined([closer])


def _describe(pool: cf.ProcessPoolExecutor, future: cf.Future[Any], name: str) -> str:
    """A stranded future, with what the pool knows of it (private state: diagnosis only)."""
    items = getattr(pool, "_pending_work_items", {})
    queued = any(item.future is future for item in list(items.values()))
    return (f"{name} ({future!r}; pool broken: {getattr(pool, '_broken', '?')!r}; "
            f"still in the pool's pending work items: {queued}, of {len(items)})")


def _after_the_break(context: Any, tally: Tally, r: int) -> None:
    """A new pool works at once, and its tasks see their submitters' contexts."""
    with propagate.ProcessPoolExecutor(2, mp_context=context) as pool:
        for i in range(4):
            with request(f"after-{r}-{i}") as exp:
                settle([pool.submit(thread_task, exp.through(process=True))], tally,
                       f"round {r}: a new pool after the break")


@pytest.mark.stress(rounds=2)
def test_resolver_closed_with_lookups_in_flight(run: Run) -> None:
    """I7: close() while lookups run and queue: each resolves or is refused; none hangs or leaks."""
    rounds = run.size(quick=40, long=150)
    for r in range(rounds):
        gate = threading.Event()
        lookup = CheckingLookup(gate)
        resolver = Resolver(max_workers=2, getaddrinfo=lookup, max_pending=6)
        wait = run.rng.random() < 0.5
        outcomes = run_async(_close_amid_lookups(resolver, lookup, gate, wait, run.rng, r),
                             run.tally, f"round {r}: closing amid lookups")
        gate.set()  # after a stall too: nothing stays gated
        run.tally.absorb(lookup.tally)
        for i, outcome in enumerate(outcomes or ()):
            refused = isinstance(outcome, RuntimeError) and "after close()" in str(outcome)
            answered = isinstance(outcome, list) and outcome
            if isinstance(outcome, Stalled):
                run.tally.stall(f"round {r}, lookup {i}: {outcome}")
            elif not (answered or refused):
                run.tally.problem(f"round {r}, lookup {i}: {outcome!r}")
        resolver.close(wait=True)
    run.verify()


async def _close_amid_lookups(resolver: Resolver, lookup: CheckingLookup,
                              gate: threading.Event, wait: bool, rng: random.Random,
                              r: int) -> list[Any]:
    async def ask(i: int) -> Any:
        with request(f"closing-{r}-{i}") as exp:
            if rng.random() < 0.3:  # the blocking form, from a thread
                return await propagate.to_thread(
                    lambda: resolver.resolve("localhost", lookup.ask(exp)))
            return await resolver.getaddrinfo("localhost", lookup.ask(exp))

    lookups = [asyncio.create_task(ask(i)) for i in range(rng.randint(4, 20))]
    entering = Deadline()
    started = await asyncio.to_thread(
        until, lambda seconds: lookup.entered.acquire(timeout=seconds), entering)
    closer = threading.Thread(target=resolver.close, kwargs={"wait": wait})
    closer.start()  # with wait=True it blocks until the gated lookups finish
    await asyncio.sleep(rng.uniform(0, 0.01))
    gate.set()
    outcomes = list(await asyncio.gather(*lookups, return_exceptions=True))
    if not started:
        outcomes.append(Stalled(f"no lookup started: {entering.why()}"))
    closing = Deadline()
    if await asyncio.to_thread(joined, [closer], closing):
        outcomes.append(Stalled(f"close(wait={wait}) never returned: {closing.why()}"))
    try:
        await resolver.getaddrinfo("localhost", 80)
    except RuntimeError as exc:
        outcomes.append(exc)
    else:
        outcomes.append(AssertionError("a closed resolver took a new lookup"))
    return outcomes


@pytest.mark.stress(rounds=2)
def test_lookups_time_out_and_cancel(run: Run) -> None:
    """I4, I7: lookups given up on (timeout, cancel) still end their spans on the lookup thread."""
    rounds = run.size(quick=40, long=150)
    for r in range(rounds):
        gate = threading.Event()
        lookup = CheckingLookup(gate)
        with Resolver(max_workers=2, getaddrinfo=lookup, max_pending=4,
                      timeout=run.rng.uniform(0.005, 0.03)) as resolver:
            outcomes = run_async(_give_up(resolver, lookup, gate, run.rng, r), run.tally,
                                 f"round {r}: giving up on lookups")
            gate.set()  # after a stall too: nothing stays gated
        run.tally.absorb(lookup.tally)
        for i, outcome in enumerate(outcomes or ()):
            if not isinstance(outcome, (list, LookupTimeout, asyncio.CancelledError)):
                run.tally.problem(f"round {r}, lookup {i}: {outcome!r}")
    run.verify()  # every dns.lookup span ended, on its own thread


async def _give_up(resolver: Resolver, lookup: CheckingLookup, gate: threading.Event,
                   rng: random.Random, r: int) -> list[Any]:
    async def ask(i: int) -> Any:
        with request(f"giving-up-{r}-{i}") as exp:
            try:
                return await resolver.getaddrinfo("localhost", lookup.ask(exp))
            finally:
                intact_after = intact(exp, "lookup caller")
                if intact_after[1]:
                    lookup.tally.add(intact_after)

    lookups = [asyncio.create_task(ask(i)) for i in range(rng.randint(4, 16))]
    await asyncio.sleep(rng.uniform(0, 0.02))
    for task in lookups:
        if rng.random() < 0.3:
            task.cancel()
    outcomes = await asyncio.gather(*lookups, return_exceptions=True)
    gate.set()  # the lookups given up on finish now, on their threads
    return list(outcomes)


@pytest.mark.stress(rounds=2)
def test_coroutines_cancelled_while_threads_run(run: Run) -> None:
    """I2, I7: a coroutine cancelled while its work is queued or running in a thread.

    Its work runs at most once, in its context, and never if it was still queued when
    cancelled (asyncio cancels the queued ``concurrent.futures`` future); the coroutine's
    own context is intact after the cancellation.
    """
    requests = run.size(quick=4000, long=15000)
    counts = {"submitted": 0, "uncancelled": 0}

    async def one(i: int, rng: random.Random, gate: asyncio.Semaphore) -> None:
        async with gate:
            with request(f"cancelled-{i}", scoped=rng.random() < 0.3) as exp:
                work = asyncio.ensure_future(propagate.to_thread(
                    _record_after, run.tally, exp, rng.uniform(0, 0.002)))
                counts["submitted"] += 1
                await asyncio.sleep(rng.uniform(0, 0.002))
                if rng.random() < 0.5 and work.cancel():
                    try:
                        await work
                    except asyncio.CancelledError:
                        pass
                    else:
                        run.tally.problem(f"{exp.request_id}: cancelled, yet a result came")
                else:
                    await work
                    counts["uncancelled"] += 1
                run.tally.add(intact(exp, "cancelled coroutine"))

    async def main() -> None:
        propagate.install()
        gate = asyncio.Semaphore(32)
        await asyncio.gather(*(one(i, random.Random(f"{run.seed}-{i}"), gate)
                               for i in range(requests)))

    # asyncio.run shuts the executor down: the work has run
    run_async(main(), run.tally, "coroutines cancelled")
    ran = run.tally.tasks - requests  # less the coroutines' own checks
    if not counts["uncancelled"] <= ran <= counts["submitted"]:
        run.tally.problem(f"{ran} pieces of work ran; {counts['submitted']} were submitted, "
                          f"{counts['uncancelled']} of them never cancelled")
    run.verify()


def _record_after(tally: Tally, exp: Expected, delay: float) -> None:
    time.sleep(delay)
    tally.add(check(exp, "work of a cancelled coroutine"))
