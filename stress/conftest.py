"""The stress session: a real SDK provider that keeps nothing, seeds, sizes, and the summary.

Every test takes the `run` fixture. It gives the test its seed, its size (``quick`` or
``long``, from ``--stress-scale`` or ``STRESS_SCALE``) and a `Tally`; runs the test with
and without ``propagate.debug.jitter`` (a parameter); and after the test fails it if a
thread or child process it started is still running. The test ends with
``run.verify(...)``, which asserts the invariants every workload shares (no mismatch, no
stall, no "Failed to detach context", every span ended on its starting thread and none
left open) and records the figures that the summary at the end of the session prints.

``STRESS_REPORT=path`` also writes the figures there, as JSON.

Seeds: ``--stress-seed=N`` or ``STRESS_SEED=N`` (default: a random one, printed). Each
test's own seed is derived from it and the test's id, so passing the printed seed back
replays every test's decisions, whichever xdist worker runs it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from workload import HARD, WAIT, Affinity, Deadline, DetachFailures, Tally

import propagate.debug

SCALES = ("quick", "long")
JITTER_PROBABILITY = 0.05  # a sleep at one switch point in twenty...
JITTER_MAX_DELAY = 0.001  # ...of up to 1 ms: reorders threads, keeps the quick suite quick
GRACE = 15.0  # seconds without progress for threads, processes and spans that are finishing
LONG_TIMEOUT = 3600  # pytest-timeout per test in the long suite...
# ...and in the quick one: a last resort for a hang no wait of the harness bounds. It counts
# from the start, so it is no less than a wait's hard bound (setup.cfg's 300 is for tests/)
QUICK_TIMEOUT = max(300, HARD * WAIT)

AFFINITY = Affinity()
DETACH_FAILURES = DetachFailures()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(AFFINITY)
trace.set_tracer_provider(PROVIDER)
logging.getLogger("opentelemetry.context").addHandler(DETACH_FAILURES)

_FIGURES: list[dict[str, Any]] = []  # collected in the controller, from every worker


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stress")
    group.addoption("--stress-seed", type=int, default=None, metavar="N",
                    help="base seed (default: $STRESS_SEED, else random); printed at the end")
    group.addoption("--stress-scale", choices=SCALES, default=None,
                    help="quick (CI, default) or long (>= 1,000,000 tasks); or $STRESS_SCALE")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stress(rounds=1, jitter=True): rounds in the long suite (each with its "
        "own seed), and whether to run under jitter as well as without")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller decided
        seed, scale = workerinput["stress_seed"], workerinput["stress_scale"]
    else:
        seed = config.getoption("stress_seed")
        if seed is None:
            seed = int(os.environ.get("STRESS_SEED") or random.SystemRandom().randrange(10**6))
        scale = config.getoption("stress_scale") or os.environ.get("STRESS_SCALE") or "quick"
        if scale not in SCALES:
            raise pytest.UsageError(f"STRESS_SCALE must be one of {SCALES}, not {scale!r}")
    config.stash[SEED], config.stash[SCALE] = seed, scale


SEED = pytest.StashKey[int]()
SCALE = pytest.StashKey[str]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist: every worker gets the controller's seed and scale."""
    node.workerinput["stress_seed"] = node.config.stash[SEED]
    node.workerinput["stress_scale"] = node.config.stash[SCALE]


def pytest_report_header(config: pytest.Config) -> str:
    return (f"stress: scale={config.stash[SCALE]} seed={config.stash[SEED]} "
            f"(replay with --stress-seed={config.stash[SEED]})")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("stress")
    options = marker.kwargs if marker else {}
    rounds = options.get("rounds", 1) if metafunc.config.stash[SCALE] == "long" else 1
    jitters = (False, True) if options.get("jitter", True) else (False,)
    params = [(j, r) for r in range(rounds) for j in jitters]
    ids = [("jitter" if j else "plain") + (f"-r{r}" if rounds > 1 else "") for j, r in params]
    metafunc.parametrize("run", params, ids=ids, indirect=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    timeout = max(LONG_TIMEOUT, QUICK_TIMEOUT) if config.stash[SCALE] == "long" else QUICK_TIMEOUT
    for item in items:
        item.add_marker(pytest.mark.timeout(timeout))


class Run:
    """One workload's seed, size and tally, and the checks every workload ends with."""

    def __init__(self, config: pytest.Config, nodeid: str, jitter: bool) -> None:
        self.base_seed = config.stash[SEED]
        self.seed = zlib.crc32(f"{self.base_seed}:{nodeid}".encode())
        self.scale = config.stash[SCALE]
        self.jitter = jitter
        self.rng = random.Random(self.seed)
        self.tally = Tally()
        self.nodeid = nodeid
        self.hook: propagate.debug.Jitter | None = None
        self.memory: dict[str, int] = {}  # set by the memory workloads
        self.verified = False
        self._spans = AFFINITY.figures()
        self._detach = DETACH_FAILURES.count
        self._start = time.perf_counter()

    @property
    def long(self) -> bool:
        return self.scale == "long"

    def size(self, quick: int, long: int) -> int:
        return long if self.long else quick

    def widened(self) -> AbstractContextManager[Any]:
        """Jitter at propagate's switch points if this run has it; else nothing."""
        if not self.jitter:
            return nullcontext()
        return propagate.debug.jitter(self.seed, JITTER_PROBABILITY, JITTER_MAX_DELAY)

    def replay(self) -> str:
        return (f"seed {self.seed} (base seed {self.base_seed}; replay with "
                f"--stress-seed={self.base_seed} or STRESS_SEED={self.base_seed})")

    def spans(self) -> dict[str, Any]:
        """Span figures since the test started: ended, relayed by name, wrong thread, open."""
        now = AFFINITY.figures()
        relayed = {name: n - self._spans["relayed"].get(name, 0)
                   for name, n in now["relayed"].items()}
        return {"ended": now["ended"] - self._spans["ended"],
                "relayed": {name: n for name, n in relayed.items() if n},
                "wrong_thread": now["wrong_thread"] - self._spans["wrong_thread"],
                "open": now["open"] - self._spans["open"]}

    def verify(self, tasks: int | None = None, relayed: dict[str, int] | None = None) -> None:
        """Assert what every workload must end with; ``tasks``, ``relayed``: exact counts."""
        __tracebackhide__ = True
        self.verified = True
        spans = self.spans()
        deadline = Deadline(GRACE)
        while spans["open"] and deadline.left() > 0:  # spans ending right now
            time.sleep(0.01)
            before, spans = spans, self.spans()
            if len(spans["open"]) < len(before["open"]):
                deadline.moved()
        failures = []
        if self.tally.mismatches:
            failures.append(f"{self.tally.mismatches} mismatches; the first:\n    "
                            + "\n    ".join(self.tally.first))
        if self.tally.stalls:
            failures.append(f"{self.tally.stalls} stalls (waits that ran out: hangs, not wrong "
                            "contexts); the first:\n    "
                            + "\n    ".join(self.tally.first_stalls))
        if tasks is not None and self.tally.tasks != tasks:
            failures.append(f"{self.tally.tasks} tasks checked, expected {tasks}"
                            + (" (a stall cut some short)" if self.tally.stalls else ""))
        detached = DETACH_FAILURES.count - self._detach
        if detached:
            failures.append(f'{detached} "Failed to detach context" records: '
                            f"{DETACH_FAILURES.first}")
        if spans["wrong_thread"]:
            failures.append(f"{spans['wrong_thread']} spans ended on another thread than "
                            f"they started on: {AFFINITY.first}")
        if spans["open"]:
            failures.append(f"{len(spans['open'])} spans started and never ended")
        if relayed is not None and spans["relayed"] != relayed:
            failures.append(f"spans relayed from worker processes: {spans['relayed']}, "
                            f"expected {relayed} (each exactly once)")
        if trace.get_current_span().get_span_context().is_valid:
            failures.append("the test's own thread is left inside a span")
        if failures:
            pytest.fail(f"{self.nodeid} at {self.replay()}:\n  " + "\n  ".join(failures),
                        pytrace=False)

    def figures(self) -> dict[str, Any]:
        spans = self.spans()
        return {
            "nodeid": self.nodeid, "scale": self.scale, "seed": self.seed,
            "base_seed": self.base_seed, "jitter": self.jitter,
            "delays": self.hook.delays if self.hook else 0,
            "tasks": self.tally.tasks, "mismatches": self.tally.mismatches,
            "stalls": self.tally.stalls,
            "detach_failures": DETACH_FAILURES.count - self._detach,
            "spans": spans["ended"], "relayed": sum(spans["relayed"].values()),
            "wrong_thread": spans["wrong_thread"], "open_spans": len(spans["open"]),
            "memory": self.memory, "wall": time.perf_counter() - self._start,
        }


@pytest.fixture
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """The workload's seed, size and tally; runs it under jitter or not; checks leftovers."""
    jitter, _ = request.param
    threads = set(threading.enumerate())
    children = set(multiprocessing.active_children())
    this = Run(request.config, request.node.nodeid, jitter)
    request.node.stash[RUN] = this
    try:
        with this.widened() as hook:
            this.hook = hook
            yield this
    finally:
        request.node.user_properties.append(("stress", this.figures()))
    left = _left_behind(threads, children)
    if left:
        pytest.fail(f"left running after the workload ({this.replay()}): {left}", pytrace=False)


RUN = pytest.StashKey[Run]()


def _left_behind(threads: set[threading.Thread], children: set[Any]) -> list[str]:
    """Threads and child processes not there before, once `GRACE` seconds pass with none
    of them finishing."""
    deadline, before = Deadline(GRACE), None
    while True:
        left = [f"thread {t.name!r}" for t in threading.enumerate() if t not in threads]
        left += [f"process {p.name!r} (pid {p.pid})"
                 for p in multiprocessing.active_children() if p not in children]
        if before is not None and len(left) < before:
            deadline.moved()
        if not left or deadline.left() <= 0:
            return left
        before = len(left)
        time.sleep(0.05)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    this = item.stash.get(RUN, None)
    if this is not None and report.failed:
        report.sections.append(("stress seed", this.replay()))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """In the controller (or the only process): keep each workload's figures."""
    if report.failed:
        _FAILED.add(report.nodeid)
    if report.when != "teardown":
        return
    failed = report.nodeid in _FAILED
    for name, figures in report.user_properties:
        if name == "stress":
            _FIGURES.append(dict(figures, outcome="failed" if failed else "ok"))


_FAILED: set[str] = set()  # workloads that failed in any phase


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    if not _FIGURES or hasattr(config, "workerinput"):
        return
    report = os.environ.get("STRESS_REPORT")
    if report:  # the same figures, for machines
        with open(report, "w") as file:
            json.dump(sorted(_FIGURES, key=lambda f: f["nodeid"]), file, indent=1)
    write = terminalreporter.write_line
    terminalreporter.section("stress figures")
    rows = sorted(_FIGURES, key=lambda f: f["nodeid"])
    write(f"{'workload':<72} {'tasks':>9} {'mism':>5} {'stall':>5} {'spans':>9} "
          f"{'relayed':>7} {'sleeps':>6} {'wall s':>7}  retained")
    for f in rows:
        name = f["nodeid"].split("/")[-1]
        flag = "" if f["outcome"] == "ok" else "  FAILED"
        write(f"{name:<72.72} {f['tasks']:>9,} {f['mismatches']:>5} {f['stalls']:>5} "
              f"{f['spans']:>9,} {f['relayed']:>7,} {f['delays']:>6,} {f['wall']:>7.1f}  "
              f"{_memory(f)}{flag}")
    total = sum(f["tasks"] for f in rows)
    worst = [f["memory"] for f in rows if f["memory"]]
    write(f"scale={rows[0]['scale']} base seed={rows[0]['base_seed']} "
          f"(replay: --stress-seed={rows[0]['base_seed']}): {len(rows)} workloads, "
          f"{total:,} tasks, {sum(f['mismatches'] for f in rows)} mismatches, "
          f"{sum(f['stalls'] for f in rows)} stalls, "
          f"{sum(f['detach_failures'] for f in rows)} detach failures, "
          f"{sum(f['wrong_thread'] for f in rows)} spans ended on another thread, "
          f"{sum(f['open_spans'] for f in rows)} left open; "
          f"{sum(f['outcome'] != 'ok' for f in rows)} workloads failed")
    if worst:
        write("memory: retained growth at most "
              f"{max(m['growth'] for m in worst) / 1024:+.1f} KiB from N to 10N tasks; "
              f"peak traced {max(m['peak'] for m in worst) / 1024 ** 2:.1f} MiB; "
              f"largest N: {max(m['n'] for m in worst):,}")


def _memory(f: dict[str, Any]) -> str:
    m = f["memory"]
    if not m:
        return ""
    return (f"{m['growth'] / 1024:+.1f} KiB over {m['n']:,}->{10 * m['n']:,}, "
            f"peak {m['peak'] / 1024 ** 2:.1f} MiB")
