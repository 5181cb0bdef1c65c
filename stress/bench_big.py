"""Big arguments through process pools: propagate against the stdlib, time and peak memory.

Two cases, each run by both pools, rounds alternating which side goes first:

* shared: 200 tasks, ``len(arg)``, all 200 ``submit`` calls passing the SAME 5 MiB
  ``bytes`` object;
* one: one task, ``len(arg)``, with one 100 MiB ``bytes`` argument.

A: ``concurrent.futures.ProcessPoolExecutor``; B: ``propagate.ProcessPoolExecutor``; two
workers each, inside a span with a recording tracer provider installed (so B carries a
trace identity and has the relay on). Two measures, each as the median of the per-round
ratios B/A (target: at most 1.10 for both):

* time: from the first ``submit`` until every result is in;
* peak memory: the parent process's peak RSS during that phase minus its RSS just
  before it, measured after the argument was allocated: the argument itself is NOT
  counted, only what the pool adds (pickles, buffers, copies). Workers are not counted.

Peak RSS only ever grows in a process, so every side of every round runs in a fresh
child process (``--child``) that makes its pool, warms it up (one tiny task per worker,
so starting workers is not measured), allocates the argument, resets the peak (on
Linux by writing 5 to ``/proc/self/clear_refs``, so the peak is exactly that of the
measured phase) and prints one JSON line. Results are checked (every task must return
the argument's length); a wrong result fails, a slow machine does not.

    python stress/bench_big.py                 # 9 rounds
    python stress/bench_big.py --quick         # 3 rounds (the sizes stay the same)
    python stress/bench_big.py --json --rounds 5 --start spawn
    python stress/bench_big.py --child ours --case shared     # one measurement, as JSON
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import gc
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import propagate

MiB = 2**20
WORKERS = 2
CASES = {  # name: (tasks, argument size, label)
    "shared": (200, 5 * MiB, "5 MiB shared by 200 tasks"),
    "one": (1, 100 * MiB, "100 MiB, one task"),
}
SIDES = {"std": cf.ProcessPoolExecutor, "ours": propagate.ProcessPoolExecutor}
TARGET = 1.10
TARGETS = {f"big, {label}: {measure}": TARGET  # the rows' names, as `bench` makes them
           for _, _, label in CASES.values() for measure in ("time", "peak memory")}
MEASURED = ("peak RSS of the parent during submit..results, minus its RSS after the argument "
            "was allocated (the argument itself not counted; workers not counted)")


# -- the child: one side, one case, one fresh process -------------------------------------


class PeakMeter:
    """The process's peak RSS growth from now on, in bytes.

    On Linux, ``VmHWM`` reset through ``/proc/self/clear_refs``: exact. Elsewhere (or if
    the reset is refused), the lifetime peak from ``getrusage`` against the peak so far:
    growth beyond any earlier peak only, an underestimate.
    """

    def __init__(self) -> None:
        self.exact = _reset_peak()
        self.base = _status("VmRSS") if self.exact else _maxrss()

    def growth(self) -> int:
        return max(0, (_status("VmHWM") if self.exact else _maxrss()) - self.base)


def _status(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak RSS) from ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as f:
        found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if found is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(found.group(1)) * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmHWM") <= _status("VmRSS") + 64 * 1024  # it took
    except OSError:  # not Linux, or refused
        return False


def _maxrss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def child(side: str, case: str, start: str) -> dict[str, Any]:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())  # recording, exporting nowhere: relay on
    tasks, size, _ = CASES[case]
    pool = SIDES[side](WORKERS, mp_context=multiprocessing.get_context(start))
    with pool, trace.get_tracer("bench").start_as_current_span("bench"):
        warm = [pool.submit(len, b"x") for _ in range(WORKERS)]  # starts every worker
        if [f.result() for f in warm] != [1] * WORKERS:
            raise SystemExit(f"wrong warm-up results from {side}")
        arg = bytes(range(256)) * (size // 256)  # every page touched: it is all resident
        gc.collect()
        meter = PeakMeter()
        began = time.perf_counter()
        futures = [pool.submit(len, arg) for _ in range(tasks)]
        results = [f.result() for f in futures]
        seconds = time.perf_counter() - began
        peak = meter.growth()
        retained = (_status("VmRSS") - meter.base) if meter.exact else None
    wrong = sum(r != size for r in results)
    if wrong or len(results) != tasks:
        raise SystemExit(f"{side}/{case}: {wrong} of {len(results)} results wrong "
                         f"(expected {tasks} results of {size})")
    return {"side": side, "case": case, "start": start, "tasks": tasks, "arg_bytes": size,
            "seconds": seconds, "peak_growth_bytes": peak, "retained_bytes": retained,
            "exact_peak": meter.exact, "propagate_file": propagate.__file__}


# -- the parent: alternate the sides round by round ---------------------------------------


def measure(side: str, case: str, start: str) -> dict[str, Any]:
    """One fresh child process's measurement; fails only if the child did (wrong results)."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", side,
                           "--case", case, "--start", start],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench_big child {side}/{case} failed ({done.returncode}):\n"
                           f"{done.stderr}{done.stdout}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if os.path.realpath(result["propagate_file"]) != os.path.realpath(propagate.__file__):
        raise RuntimeError(f"the child measured propagate from {result['propagate_file']}, "
                           f"not {propagate.__file__}")
    return result


def bench(rounds: int = 9, start: str = "fork",
          cases: tuple[str, ...] = tuple(CASES)) -> dict[str, dict[str, float]]:
    """Two rows per case, time and peak memory: A (stdlib) and B (propagate), median ratio B/A.

    Time rows have ``a_us``/``b_us`` per task, as `paired` does, and ``a_s``/``b_s`` for the
    whole phase; memory rows ``a_mib``/``b_mib`` (see MEASURED). Rounds alternate which side
    goes first.
    """
    rows: dict[str, dict[str, float]] = {}
    for case in cases:
        tasks, _, label = CASES[case]
        runs: dict[str, list[dict[str, Any]]] = {"std": [], "ours": []}
        for i in range(rounds):
            for side in (("ours", "std") if i % 2 else ("std", "ours")):
                runs[side].append(measure(side, case, start))
        a, b = runs["std"], runs["ours"]
        common = {"rounds": rounds, "tasks": tasks}
        rows[f"big, {label}: time"] = {
            "a_us": _median(a, "seconds") * 1e6 / tasks,
            "b_us": _median(b, "seconds") * 1e6 / tasks,
            "a_s": _median(a, "seconds"), "b_s": _median(b, "seconds"),
            "ratio": _ratio(a, b, "seconds"), **_spread(a, b, "seconds"), **common}
        rows[f"big, {label}: peak memory"] = {
            "a_mib": _median(a, "peak_growth_bytes") / MiB,
            "b_mib": _median(b, "peak_growth_bytes") / MiB,
            "ratio": _ratio(a, b, "peak_growth_bytes", floor=4096),  # a page
            **_spread(a, b, "peak_growth_bytes", floor=4096), **common}
        if not (a[0]["exact_peak"] and b[0]["exact_peak"]):
            rows[f"big, {label}: peak memory"]["lifetime_peak_only"] = 1.0
    return rows


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def _ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str,
            floor: float = 1e-9) -> list[float]:
    """The per-round ratios B/A."""
    return [rb[key] / max(ra[key], floor) for ra, rb in zip(a, b, strict=True)]


def _ratio(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str,
           floor: float = 1e-9) -> float:
    return float(statistics.median(_ratios(a, b, key, floor)))


def _spread(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str,
            floor: float = 1e-9) -> dict[str, float]:
    """The per-round ratios' quartiles, to tell a real difference from a noisy machine."""
    ratios = _ratios(a, b, key, floor)
    if len(ratios) < 2:
        return {"ratio_q1": ratios[0], "ratio_q3": ratios[0]}
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"ratio_q1": q1, "ratio_q3": q3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds (the sizes stay)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 9)")
    parser.add_argument("--start", default="fork", choices=multiprocessing.get_all_start_methods(),
                        help="the pools' start method (default fork)")
    parser.add_argument("--case", choices=list(CASES), default=None,
                        help="only this case (default both)")
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.case or "shared", args.start)))
        return 0
    rounds = args.rounds or (3 if args.quick else 9)
    rows = bench(rounds, args.start, (args.case,) if args.case else tuple(CASES))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'row':<46} {'A stdlib':>12} {'B propagate':>12} {'B/A':>6} {'q1..q3':>13} "
          f"{'target':>7}")
    for row, r in rows.items():
        a, b = ((f"{r['a_s']:.3f} s", f"{r['b_s']:.3f} s") if "a_s" in r
                else (f"{r['a_mib']:.1f} MiB", f"{r['b_mib']:.1f} MiB"))
        mark = f"{TARGET:>7.2f}" + (" !" if r["ratio"] > TARGET else "")
        spread = f"{r['ratio_q1']:.2f}..{r['ratio_q3']:.2f}"
        print(f"{row:<46} {a:>12} {b:>12} {r['ratio']:>6.3f} {spread:>13} {mark}")
    print(f"\ntime: first submit to last result. memory: {MEASURED}. "
          f"Medians of {rounds} alternating rounds (q1..q3: the quartiles of the per-round "
          f"ratios), each side in a fresh process; start "
          f"method {args.start}; {WORKERS} workers. propagate from {propagate.__file__}. "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
