"""The harness's own bounded waits: a slow machine that moves is waited for; a stall is not.

Every wait of the suite counts its deadline from the last progress, not from its start,
and one that runs out is a *stall*, tallied apart from the mismatches. These tests pass
small bounds (fractions of a second) in place of `WAIT`, so they take a few seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pytest
from conftest import Run
from workload import (
    PROGRESS,
    Deadline,
    Stalled,
    Tally,
    request,
    result,
    run_async,
    settle,
    submitters,
    unresolved,
    watched,
)

STALL = 0.5  # seconds: the stall bound these tests pass in place of WAIT
STEP = 0.1  # seconds between two signs of progress: well within STALL, even under load


@contextmanager
def in_background(target: Callable[..., object], *args: object) -> Iterator[None]:
    """Run ``target(*args, stop)`` on a thread for the block; stop it and join it after."""
    stop = threading.Event()
    thread = threading.Thread(target=target, args=(*args, stop), name="stress-unit")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def resolve_one_by_one(futures: Sequence[cf.Future[object]], times: list[float],
                       stop: threading.Event) -> None:
    """Resolve ``futures`` one every STEP, noting when in ``times``."""
    for future in futures:
        if stop.wait(STEP):
            return
        future.set_result((1, ()))
        times.append(time.monotonic())


def keep_moving(stop: threading.Event) -> None:
    """Stands for the rest of a workload: tasks checked elsewhere in this process."""
    while not stop.wait(STEP / 2):
        PROGRESS.note()


@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_slow_futures_that_keep_resolving_are_no_stall(order: str) -> None:
    """(a) 12 futures, one resolving every STEP: 2.4 stall bounds in all, never one quiet."""
    futures: list[cf.Future[object]] = [cf.Future() for _ in range(12)]
    resolving = futures if order == "in order" else futures[::-1]  # waited on in list order
    tally = Tally()
    began = time.monotonic()
    with in_background(resolve_one_by_one, resolving, []):
        settle(futures, tally, "slow futures", stall=STALL)
    assert time.monotonic() - began > 2 * STALL
    assert (tally.tasks, tally.mismatches, tally.stalls) == (12, 0, 0), tally.first_stalls


def test_a_stalled_future_is_a_stall_not_a_mismatch() -> None:
    """(b) One future of four never resolves: one stall, saying what was left, and why."""
    futures: list[cf.Future[object]] = [cf.Future() for _ in range(4)]
    tally, times = Tally(), list[float]()
    with in_background(resolve_one_by_one, futures[:3], times):
        settle(futures, tally, "stalled futures", stall=STALL)
    quiet = time.monotonic() - times[-1]
    assert (tally.tasks, tally.mismatches, tally.stalls) == (3, 0, 1)
    assert tally.first == []
    [text] = tally.first_stalls
    assert text.startswith("stalled futures: 1 of 4 futures unresolved (0 running, 1 queued)")
    assert "no progress for" in text
    assert STALL <= quiet < STALL + 4 * STEP  # counted from the last progress, no later
    assert futures[3].cancelled()  # settle gives up on it

    parent = Tally()
    parent.absorb(tally)
    assert (parent.mismatches, parent.stalls, parent.first_stalls) == (0, 1, [text])


def test_progress_elsewhere_keeps_a_wait_going() -> None:
    """A future resolving after 3 stall bounds, while the rest of the process moves."""
    future: cf.Future[str] = cf.Future()
    timer = threading.Timer(3 * STALL, future.set_result, args=("done",))
    with in_background(keep_moving):
        timer.start()
        assert result(future, "one slow future", stall=STALL) == "done"
    timer.join(10)


def test_the_hard_bound_holds_even_while_moving() -> None:
    """Progress keeps a wait going, but not for ever: it ends at the hard bound."""
    future: cf.Future[object] = cf.Future()
    deadline = Deadline(STALL, hard=4 * STALL)
    began = time.monotonic()
    with in_background(keep_moving):
        assert unresolved([future], deadline=deadline) == [future]
    assert 4 * STALL <= time.monotonic() - began < 4 * STALL + 1.0
    assert "hard bound" in deadline.why()


def test_a_stall_in_a_nested_wait_is_a_stall() -> None:
    """A task stalled on an inner future: the outer settle tallies a stall, not a mismatch."""
    inner: cf.Future[object] = cf.Future()  # never resolved
    with cf.ThreadPoolExecutor(1) as pool:
        outer = pool.submit(result, inner, "task -> inner", STALL)
        tally = Tally()
        settle([outer], tally, "nested", stall=10 * STALL)
    assert (tally.mismatches, tally.stalls) == (0, 1)
    assert tally.first_stalls[0].startswith("nested: task -> inner: 1 of 1 futures unresolved")


def test_submitters_slow_but_moving_or_stalled() -> None:
    """Submitters entering a request every STEP for 3 stall bounds are waited for; one
    that stops moving is a stall naming it and where it is."""
    def moving(index: int, rng: random.Random) -> None:
        for i in range(round(3 * STALL / STEP)):
            with request(f"unit-{index}-{i}"):
                time.sleep(STEP)

    tally = Tally()
    submitters(2, 0, moving, tally, stall=STALL)
    assert (tally.mismatches, tally.stalls) == (0, 0), tally.first_stalls

    release = threading.Event()

    def silent(index: int, rng: random.Random) -> None:
        release.wait(30)

    try:
        submitters(1, 0, silent, tally, stall=STALL)
    finally:
        release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("stress-submitter-"):
            thread.join(10)
    assert (tally.mismatches, tally.stalls) == (0, 1)
    text = tally.first_stalls[0]
    assert text.startswith("submitters still running; no progress for")
    assert "stress-submitter-0 at " in text and "wait" in text  # where it is stuck


def test_coroutines_slow_but_moving_or_stalled() -> None:
    """`watched` waits for a coroutine that moves; a stalled one is cancelled, a stall."""
    async def moving() -> str:
        for _ in range(round(3 * STALL / STEP)):
            await asyncio.sleep(STEP)
            PROGRESS.note()
        return "done"

    assert asyncio.run(watched(moving(), "moving", stall=STALL)) == "done"

    with pytest.raises(Stalled, match=r"^stalled: no progress for"):
        asyncio.run(watched(asyncio.sleep(30), "stalled", stall=STALL))

    async def main() -> None:  # a stall deep inside: run_async tallies it
        await watched(asyncio.sleep(30), "inner", stall=STALL)

    tally = Tally()
    assert run_async(main(), tally, "main") is None
    assert (tally.mismatches, tally.stalls) == (0, 1)
    assert tally.first_stalls[0].startswith("inner: no progress for")


def test_verify_reports_a_stall_as_such(pytestconfig: pytest.Config) -> None:
    """The workload fails on a stall, and the failure says stall, not mismatch."""
    run = Run(pytestconfig, "unit", jitter=False)
    run.tally.stall("pool: 1 of 4 futures unresolved (0 running, 1 queued); no progress")
    with pytest.raises(pytest.fail.Exception) as failed:
        run.verify()
    text = str(failed.value)
    assert "1 stalls (waits that ran out: hangs, not wrong contexts); the first:" in text
    assert "pool: 1 of 4 futures unresolved" in text
    assert "mismatch" not in text
