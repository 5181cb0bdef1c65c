"""The paired measurement every benchmark here uses: A and B alternating in one run."""

from __future__ import annotations

import statistics
from collections.abc import Callable

Timed = Callable[[int], float]  # runs n tasks, returns elapsed seconds


def paired(a: Timed, b: Timed, rounds: int, n: int) -> dict[str, float]:
    """Alternate A and B ``rounds`` times, ``n`` tasks each; medians per task, median ratio.

    Which side goes first alternates too, so neither always runs on a machine the other
    has just warmed (or loaded). The ratio is the median of the per-round ratios B/A.
    """
    a(max(1, n // 10)), b(max(1, n // 10))  # warm up both: imports, pools, the relay
    times_a, times_b, ratios = [], [], []
    for i in range(rounds):
        if i % 2:
            tb, ta = b(n), a(n)
        else:
            ta, tb = a(n), b(n)
        times_a.append(ta / n)
        times_b.append(tb / n)
        ratios.append(tb / ta)
    return {"a_us": statistics.median(times_a) * 1e6, "b_us": statistics.median(times_b) * 1e6,
            "ratio": statistics.median(ratios), "rounds": rounds, "tasks": n}
