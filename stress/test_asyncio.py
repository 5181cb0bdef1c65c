"""asyncio under load: every way a coroutine hands work to a thread, and forgotten tasks.

Hundreds of coroutines run at once, each in a request of its own, and await work in
threads by each route: ``propagate.to_thread`` (with and without an executor),
``propagate.run_in_executor`` (propagate's pool and the stdlib's), the loop's default
executor after ``propagate.install``, and the stdlib's ``asyncio.to_thread``. Some leave
a child task behind that runs after the request is over.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Run
from workload import (
    Expected,
    Outcome,
    Stalled,
    Tally,
    check,
    intact,
    request,
    run_async,
    thread_task,
    watched,
)

import propagate

Route = Callable[[Expected], Any]  # returns an awaitable of an Outcome


def routes(pool: cf.Executor, stdlib: cf.Executor) -> dict[str, Route]:
    loop = asyncio.get_running_loop()
    return {
        "to_thread": lambda exp: propagate.to_thread(thread_task, exp),
        "to_thread(executor=stdlib)": lambda exp: propagate.to_thread(
            thread_task, exp, executor=stdlib),
        "run_in_executor(propagate)": lambda exp: propagate.run_in_executor(
            pool, thread_task, exp),
        "run_in_executor(stdlib)": lambda exp: propagate.run_in_executor(
            stdlib, thread_task, exp),
        "loop.run_in_executor(None)": lambda exp: loop.run_in_executor(None, thread_task, exp),
        "asyncio.to_thread": lambda exp: asyncio.to_thread(thread_task, exp),
    }


async def forgotten(exp: Expected, delay: float, tally: Tally) -> None:
    """A child task its parent never awaits: it runs on after the request is over (I3)."""
    await asyncio.sleep(delay)
    tally.add(await propagate.to_thread(thread_task, exp))
    tally.add(check(exp, "forgotten coroutine"))


@pytest.mark.stress(rounds=4)
def test_asyncio_routes_to_threads(run: Run) -> None:
    """I1, I2, I3: coroutines' work in threads sees each coroutine's own context, by every route."""
    requests = run.size(quick=10000, long=30000)
    counts = {"expected": 0}

    async def one(i: int, rng: random.Random, by: dict[str, Route], gate: asyncio.Semaphore,
                  left: set[asyncio.Task[None]]) -> None:
        async with gate:
            with request(f"aio-{i}", scoped=rng.random() < 0.3) as exp:
                name, route = rng.choice(sorted(by.items()))
                k = rng.randint(1, 4)
                if rng.random() < 0.5:
                    outcomes: list[Outcome] = [await route(exp) for _ in range(k)]
                else:  # side by side
                    outcomes = list(await asyncio.gather(*(route(exp) for _ in range(k))))
                for outcome in outcomes:
                    run.tally.add(outcome)
                if rng.random() < 0.2:
                    task = asyncio.create_task(forgotten(exp, rng.uniform(0, 0.002), run.tally))
                    left.add(task)
                    task.add_done_callback(left.discard)
                    k += 2
                run.tally.add(intact(exp, f"coroutine ({name})"))
            counts["expected"] += k + 1

    async def main() -> None:
        propagate.install()
        pool = propagate.ThreadPoolExecutor(4, thread_name_prefix="stress-aio")
        stdlib = cf.ThreadPoolExecutor(4, thread_name_prefix="stress-aio-stdlib")
        try:
            by, gate, left = routes(pool, stdlib), asyncio.Semaphore(64), set()
            await asyncio.gather(*(one(i, random.Random(f"{run.seed}-{i}"), by, gate, left)
                                   for i in range(requests)))
            if left:
                try:
                    await watched(asyncio.wait(set(left)), "waiting for the forgotten tasks")
                except Stalled as exc:
                    run.tally.stall(f"{exc}; {len(left)} of them still pending")
        finally:
            pool.shutdown(wait=True)
            stdlib.shutdown(wait=True)

    run_async(main(), run.tally, "asyncio routes")
    run.verify(tasks=counts["expected"])
