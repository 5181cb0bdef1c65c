"""Paired benchmark: lookups of ``localhost`` through `propagate.dns.Resolver` and the stdlib.

Each round makes 1,000 lookups, 50 at a time, on each side, inside a caller span, on
thread pools of the same size; rounds alternate the order of the sides.

* A: ``loop.getaddrinfo`` inside a ``dns.lookup`` span made by the caller, with the same
  attributes: the stdlib way to the same telemetry (its span is ended on the loop);
* B: ``Resolver.getaddrinfo``: the caller's context crosses, and the ``dns.lookup`` span is
  made and ended on the lookup thread;
* bare: ``loop.getaddrinfo`` alone, no span (``ratio_bare`` is B/bare).

B/A is propagate's own cost; target <= 1.10. B/bare adds the cost of a recording span to
a lookup that takes a few microseconds (``/etc/hosts``): with the SDK's span costing about
twice the lookup, it is near 2; with no tracer provider it is near 1. Spans record with
whatever tracer provider is installed; run as a script, a recording SDK provider that
exports nowhere, as ``stress/bench.py`` has.

    python stress/bench_dns.py [rounds]
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opentelemetry import trace

from propagate.dns import Resolver

LOOKUPS = 1000
AT_ONCE = 50
THREADS = min(32, (os.cpu_count() or 1) + 4)  # the stdlib default, so both sides match

Lookup = Callable[[str, int], Awaitable[Any]]
tracer = trace.get_tracer("bench")


async def timed(lookup: Lookup) -> float:
    """Seconds per lookup, for LOOKUPS lookups of localhost with AT_ONCE in flight."""
    async def one_caller() -> None:
        for _ in range(LOOKUPS // AT_ONCE):
            await lookup("localhost", 80)

    start = time.perf_counter()
    await asyncio.gather(*(one_caller() for _ in range(AT_ONCE)))
    return (time.perf_counter() - start) / LOOKUPS


def in_caller_span(lookup: Lookup) -> Lookup:
    """``lookup`` with the dns.lookup span made on the caller's side, as without propagate."""
    async def spanned(host: str, port: int) -> Any:
        attributes = {"dns.question.name": host, "server.port": port}
        with tracer.start_as_current_span("dns.lookup", attributes=attributes) as span:
            infos = await lookup(host, port)
            span.set_attributes({"dns.answer.count": len(infos),
                                 "dns.answers": list(dict.fromkeys(i[4][0] for i in infos))})
            return infos

    return spanned


async def paired(rounds: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(cf.ThreadPoolExecutor(THREADS))
    with Resolver(THREADS) as resolver, tracer.start_as_current_span("bench"):
        sides = {"a": in_caller_span(loop.getaddrinfo), "b": resolver.getaddrinfo,
                 "bare": loop.getaddrinfo}
        for lookup in sides.values():  # warm up: threads, caches
            await timed(lookup)
        times: dict[str, list[float]] = {side: [] for side in sides}
        for i in range(rounds):
            for side in (reversed(sides) if i % 2 else sides):  # nobody always goes first
                times[side].append(await timed(sides[side]))
    med = {side: statistics.median(t) * 1e6 for side, t in times.items()}
    return {"a_us": med["a"], "b_us": med["b"],
            "ratio": statistics.median(b / a for a, b in zip(times["a"], times["b"], strict=True)),
            "bare_us": med["bare"],
            "ratio_bare": statistics.median(
                b / a for a, b in zip(times["bare"], times["b"], strict=True)),
            "rounds": rounds, "tasks": LOOKUPS}


def bench(rounds: int = 5) -> dict[str, float]:
    """Per-lookup medians of A, B and bare (see the module doc); median ratios B/A, B/bare."""
    return asyncio.run(paired(rounds))


if __name__ == "__main__":
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())  # recording, exporting nowhere
    r = bench(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
    print(f"A loop.getaddrinfo in a caller span {r['a_us']:.1f} us/lookup\n"
          f"B propagate.dns.Resolver            {r['b_us']:.1f} us/lookup\n"
          f"bare loop.getaddrinfo, no span      {r['bare_us']:.1f} us/lookup\n"
          f"B/A {r['ratio']:.3f} (target 1.10), B/bare {r['ratio_bare']:.3f}, "
          f"{r['rounds']:.0f} rounds of {r['tasks']:.0f} lookups")
