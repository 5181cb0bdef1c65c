"""DNS lookups under load: each ``dns.lookup`` runs in its caller's context, under its span.

Only ``localhost`` is resolved, with the real ``socket.getaddrinfo``, through a
`CheckingLookup` that checks the lookup thread's context first. Callers are coroutines
(``Resolver.getaddrinfo``, the aiohttp adapter) and threads (the blocking
``Resolver.resolve``) at once; in `test_dns_cap`, on two event loops, cancelled, timed out
and retried, against a resolver with a small cap.
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

import pytest
from conftest import Run
from workload import WAIT, CheckingLookup, Expected, intact, request

import propagate
from propagate.dns import AiohttpResolver, Resolver


def resolve_in_thread(resolver: Resolver, lookup: CheckingLookup, exp: Expected) -> list[Any]:
    """In a thread of the caller's: the blocking form, under the same request."""
    return resolver.resolve("localhost", lookup.ask(exp))


@pytest.mark.stress(rounds=2)
def test_dns_lookups(run: Run) -> None:
    """I1, I4: every dns.lookup sees its caller's context and is a child of its caller's span."""
    requests = run.size(quick=4000, long=15000)
    lookup = CheckingLookup()
    counts = {"lookups": 0}

    async def one(i: int, rng: random.Random, resolver: Resolver, adapter: AiohttpResolver,
                  gate: asyncio.Semaphore) -> None:
        async with gate:
            with request(f"dns-{i}", scoped=rng.random() < 0.3) as exp:
                route = rng.choice(("getaddrinfo", "aiohttp", "resolve"))
                port = lookup.ask(exp) if route != "resolve" else 0
                if route == "getaddrinfo":
                    answers: list[Any] = await resolver.getaddrinfo("localhost", port)
                    ports = {info[4][1] for info in answers}
                elif route == "aiohttp":
                    results = await adapter.resolve("localhost", port)
                    ports = {result["port"] for result in results}
                else:
                    answers = await propagate.to_thread(resolve_in_thread, resolver, lookup, exp)
                    ports = {info[4][1] for info in answers}
                if not ports or (route != "resolve" and ports != {port}):
                    run.tally.problem(f"{route} for {exp.request_id}: ports {ports}, want {port}")
                run.tally.add(intact(exp, f"dns caller ({route})"))
            counts["lookups"] += 1

    async def main() -> None:
        propagate.install()
        with Resolver(max_workers=4, getaddrinfo=lookup, timeout=WAIT) as resolver:
            adapter = AiohttpResolver(resolver)
            gate = asyncio.Semaphore(32)
            await asyncio.gather(*(one(i, random.Random(f"{run.seed}-{i}"), resolver, adapter,
                                       gate) for i in range(requests)))

    asyncio.run(asyncio.wait_for(main(), WAIT * 4))
    run.tally.absorb(lookup.tally)
    run.verify(tasks=2 * counts["lookups"])


class CountingLookup:
    """A `CheckingLookup` that counts the lookups running at once (the cap bounds them)."""

    def __init__(self, lookup: CheckingLookup) -> None:
        self.lookup = lookup
        self.running = self.most = 0
        self._lock = threading.Lock()

    def __call__(self, *question: Any) -> list[Any]:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return self.lookup(*question)
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.stress(rounds=2)
def test_dns_cap(run: Run) -> None:
    """I7: callers cancelled, timing out and retrying, on two loops and threads, keep the cap."""
    rounds = run.size(quick=30, long=200)
    lookup = CheckingLookup()
    counting = CountingLookup(lookup)
    for r in range(rounds):
        cap = run.rng.randint(1, 6)
        with Resolver(max_workers=cap + 4, max_pending=cap, getaddrinfo=counting,
                      timeout=run.rng.choice((None, 0.02))) as resolver:
            seeds = [run.rng.random() for _ in range(2)]
            outcomes = asyncio.run(asyncio.wait_for(
                _two_loops(resolver, lookup, seeds, f"{run.seed}-{r}"), WAIT * 4))
        for where, outcome in outcomes:
            if not isinstance(outcome, (list, asyncio.TimeoutError, asyncio.CancelledError)):
                run.tally.problem(f"round {r}, {where}: {outcome!r}")
        if counting.most > cap or resolver.pending:
            run.tally.problem(f"round {r}: {counting.most} lookups at once with max_pending="
                              f"{cap}; {resolver.pending} pending once all had finished")
        counting.most = 0
    run.tally.absorb(lookup.tally)
    run.verify()  # every dns.lookup span ended, on its own thread


async def _two_loops(resolver: Resolver, lookup: CheckingLookup, seeds: list[float],
                     name: str) -> list[tuple[str, Any]]:
    """Callers on this loop and, at once, on a second loop in a thread of its own."""
    def other_loop() -> list[tuple[str, Any]]:
        return asyncio.run(_callers(resolver, lookup, random.Random(f"{name}-b-{seeds[1]}"),
                                    f"{name}-b"))

    here = _callers(resolver, lookup, random.Random(f"{name}-a-{seeds[0]}"), f"{name}-a")
    mine, theirs = await asyncio.gather(here, asyncio.to_thread(other_loop))
    return mine + theirs


async def _callers(resolver: Resolver, lookup: CheckingLookup, rng: random.Random,
                   name: str) -> list[tuple[str, Any]]:
    async def ask(i: int, how: str, wait_for: float) -> Any:
        with request(f"{name}-{i}") as exp:
            try:
                for _ in range(3 if how == "wait_for" else 1):
                    try:
                        if how == "blocking":
                            return await propagate.to_thread(
                                resolver.resolve, "localhost", lookup.ask(exp))
                        lookup_now = resolver.getaddrinfo("localhost", lookup.ask(exp))
                        if how == "wait_for":
                            return await asyncio.wait_for(lookup_now, wait_for)
                        return await lookup_now
                    except asyncio.TimeoutError as exc:  # LookupTimeout too: try again
                        given_up: BaseException = exc
                return given_up
            finally:
                lookup.tally.add(intact(exp, f"dns caller ({how})"))

    hows = [rng.choice(("plain", "wait_for", "blocking")) for _ in range(rng.randint(10, 40))]
    tasks = [asyncio.ensure_future(ask(i, how, rng.uniform(0.001, 0.02)))
             for i, how in enumerate(hows)]
    await asyncio.sleep(rng.uniform(0, 0.01))
    for task, how in zip(tasks, hows, strict=True):
        if how != "blocking" and rng.random() < 0.3:
            task.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    return [(f"{name}-{i} ({how})", outcome)
            for i, (how, outcome) in enumerate(zip(hows, outcomes, strict=True))]
