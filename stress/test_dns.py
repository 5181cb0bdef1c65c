"""DNS lookups under load: each ``dns.lookup`` runs in its caller's context, under its span.

Only ``localhost`` is resolved, with the real ``socket.getaddrinfo``, through a
`CheckingLookup` that checks the lookup thread's context first. Callers are coroutines
(``Resolver.getaddrinfo``, the aiohttp adapter) and threads (the blocking
``Resolver.resolve``) at once.
"""

from __future__ import annotations

import asyncio
import random
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
