"""CPython's own test_concurrent_futures, with propagate's pools in place of the stdlib's.

    python .ci/cpython_futures.py             # propagate's ThreadPoolExecutor, ProcessPoolExecutor
                                              # (and InterpreterPoolExecutor on 3.14+)
    python .ci/cpython_futures.py --stdlib    # the same suite, unchanged, for comparison
    python .ci/cpython_futures.py --sdk       # opentelemetry-sdk's TracerProvider installed
                                              # first: process and interpreter tasks take the
                                              # relay (tox's futures-suite-* do this)
    python .ci/cpython_futures.py -v deadlock # verbose, only tests whose id contains "deadlock"

Runs the interpreter's installed ``test.test_concurrent_futures`` (a package from 3.12
on, one module before; Debian ships it as libpython3.X-testsuite) with unittest, in this
process and one test at a time, as ``python -m test`` does without -j. Every resource is
enabled (unittest outside regrtest), so the 'walltime' tests run too.

The swap, done after the test modules are imported and before any test runs:
- a class in the test modules whose own ``executor_type`` is a stdlib pool (util.py's
  ThreadPoolMixin, InterpreterPoolMixin, ProcessPool{Fork,Forkserver,Spawn}Mixin; the
  module-level mixins before 3.12) gets propagate's class;
- the test modules' ``futures`` (``from concurrent import futures``) becomes a copy of the
  module whose three pool names are propagate's, so ``futures.ThreadPoolExecutor(...)``
  in a test makes propagate's pool; ``concurrent.futures`` itself is not touched (asyncio,
  and propagate's own isinstance checks, still see the stdlib's names);
- the scripts the tests run in a child interpreter (``assert_python_ok('-c', ...)``: the
  interpreter-shutdown tests) import the pool from ``propagate`` instead of
  ``concurrent.futures``.
The swap is verified, so that a run which silently tested the stdlib fails: every pool a
test constructs is recorded (from the stdlib ``__init__``, which propagate's subclasses
call) with the test module that made it, and the run fails if a test made a stdlib pool
(or, with --stdlib, a propagate one), if a whole run made no propagate pool of some kind
(threads, processes under fork, forkserver and spawn, subinterpreters), or if no child
script was rewritten. Spawned and forkserver workers import the test modules afresh,
unswapped; that is harmless, as no test makes a pool inside a worker.

Exit status: 0 when every test passed or was skipped, except the tests listed with a
reason in cpython_futures_expected.txt (a listed test that passes fails the run: take it
off the list); 1 on any other failure or error, an unverified swap, or a test that outlasts
--timeout (every thread's stack is printed, as by regrtest's --timeout); 2 when the test
package (or propagate) is not installed: that is a failure, never a skip. The last line is
"cpython_futures: N passed, N failed, N skipped".
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import importlib
import multiprocessing
import os
import pkgutil
import re
import sys
import time
import types
import unittest

PACKAGE = "test.test_concurrent_futures"
EXPECTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpython_futures_expected.txt")

# what the pools made by test code were, and which test made them
made: list[tuple[str, str, type, str]] = []  # (test id, creator module, class, start method)
rewritten_scripts: list[str] = []
current_test = "(no test)"


def fatal(message: str, code: int = 2) -> None:
    print(f"cpython_futures: FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def import_tests() -> list[types.ModuleType]:
    """The package and every module in it (util and executor too: they hold the mixins)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError as exc:
        fatal(f"{PACKAGE} is not installed for {sys.executable} ({exc}); on Debian: "
              f"apt-get install libpython{version}-testsuite")
    except unittest.SkipTest as exc:
        fatal(f"{PACKAGE} skips itself on this interpreter: {exc}")
    modules = [package]
    if hasattr(package, "__path__"):
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            try:
                modules.append(importlib.import_module(f"{PACKAGE}.{info.name}"))
            except unittest.SkipTest as exc:  # a whole module skipped: counted, not hidden
                print(f"cpython_futures: module {info.name} skipped: {exc}", flush=True)
    return modules


def swap_map() -> dict[type, type]:
    import concurrent.futures as cf

    import propagate

    swap = {cf.ThreadPoolExecutor: propagate.ThreadPoolExecutor,
            cf.ProcessPoolExecutor: propagate.ProcessPoolExecutor}
    if hasattr(cf, "InterpreterPoolExecutor"):  # 3.14+
        swap[cf.InterpreterPoolExecutor] = propagate.InterpreterPoolExecutor
    return swap


def swap_in(modules: list[types.ModuleType], swap: dict[type, type]) -> list[str]:
    """Put propagate's pools where the test modules look for the stdlib's; say what changed."""
    import concurrent.futures as cf

    from test.support import script_helper

    futures = types.ModuleType(cf.__name__, cf.__doc__)  # concurrent.futures, three names apart
    lazy = ("__getattr__", "__dir__")
    futures.__dict__.update((k, v) for k, v in vars(cf).items() if k not in lazy)
    futures.__getattr__ = lambda name: getattr(cf, name)  # cf's lazily imported names
    for stdlib, ours in swap.items():
        setattr(futures, stdlib.__name__, ours)

    names = "|".join(cls.__name__ for cls in swap)
    pattern = re.compile(
        rf"^(\s*)from concurrent\.futures import ((?:{names})(?:\s*,\s*(?:{names}))*)\s*$",
        re.MULTILINE)

    def rewrite(source: str) -> str:
        new, count = pattern.subn(r"\1from propagate import \2", source)
        if count:
            rewritten_scripts.append(current_test)
        return new

    def in_child(run):  # assert_python_ok / assert_python_failure
        @functools.wraps(run)
        def wrapper(*args, **env):
            args = list(args)
            for i, arg in enumerate(args):
                if i and args[i - 1] == "-c" and isinstance(arg, str):
                    args[i] = rewrite(arg)
                elif isinstance(arg, str) and arg.endswith(".py") and os.path.isfile(arg):
                    with open(arg, encoding="utf-8") as f:  # a script the test just wrote
                        source = f.read()
                    if (new := rewrite(source)) != source:
                        with open(arg, "w", encoding="utf-8") as f:
                            f.write(new)
            return run(*args, **env)
        return wrapper

    children = {run: in_child(run) for run in (script_helper.assert_python_ok,
                                               script_helper.assert_python_failure)}
    for run, wrapper in children.items():
        setattr(script_helper, run.__name__, wrapper)

    changed = []
    for module in modules:
        for name, value in list(vars(module).items()):
            if value is cf:
                setattr(module, name, futures)
                changed.append(f"{module.__name__}.{name}: concurrent.futures, propagate's pools")
            elif isinstance(value, type) and value in swap:
                setattr(module, name, swap[value])
                changed.append(f"{module.__name__}.{name}")
            elif callable(value) and not isinstance(value, type) and value in children:
                setattr(module, name, children[value])
                changed.append(f"{module.__name__}.{name}: child scripts import propagate's pools")
            elif isinstance(value, type) and value.__module__ == module.__name__:
                own = value.__dict__.get("executor_type")
                if isinstance(own, type) and own in swap:
                    value.executor_type = swap[own]
                    changed.append(f"{module.__name__}.{name}.executor_type = "
                                   f"{swap[own].__module__}.{swap[own].__qualname__}")
    return changed


def watch_pools() -> None:
    """Record, from the stdlib pools' __init__, each pool that test code constructs."""
    import concurrent.futures.process
    import concurrent.futures.thread

    def creator(obj) -> str:  # the module of the first frame that is not obj's own __init__ chain
        frame = sys._getframe(2)
        while frame is not None and frame.f_locals.get("self") is obj:
            frame = frame.f_back
        return frame.f_globals.get("__name__", "?") if frame is not None else "?"

    for cls in (concurrent.futures.thread.ThreadPoolExecutor,
                concurrent.futures.process.ProcessPoolExecutor):
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, _init=init, **kwargs):
            module = creator(self)
            _init(self, *args, **kwargs)
            if module == PACKAGE or module.startswith(PACKAGE + "."):
                context = getattr(self, "_mp_context", None)
                method = context.get_start_method() if context is not None else ""
                made.append((current_test, module, type(self), method))

        cls.__init__ = __init__


def verify(swap: dict[type, type] | None, selected: bool) -> list[str]:
    """What is wrong with the swap, judging by the pools the tests made."""
    ours = tuple(swap.values()) if swap else ()
    problems = []
    for test, module, cls, _ in made:
        name = f"{cls.__module__}.{cls.__qualname__}"
        if swap and not issubclass(cls, ours):
            problems.append(f"{test} (in {module}) made the stdlib's {name}")
        if not swap and cls.__module__.startswith("propagate"):
            problems.append(f"{test} (in {module}) made propagate's {name} under --stdlib")
    if swap and not selected:
        kinds = {(next(o for o in ours if issubclass(cls, o)), method)
                 for _, _, cls, method in made if issubclass(cls, ours)}
        wanted = [(ours[0], "")]
        wanted += [(ours[1], m) for m in ("fork", "forkserver", "spawn")
                   if m in multiprocessing.get_all_start_methods()]
        if len(ours) > 2:
            wanted.append((ours[2], ""))
        for cls, method in wanted:
            if (cls, method) not in kinds:
                problems.append(f"no test made a {cls.__module__}.{cls.__qualname__}"
                                + (f" with mp_context={method!r}" if method else ""))
        if not rewritten_scripts:
            problems.append("no child-interpreter script was rewritten to import propagate's pools")
    return problems


# Tests that can hang in the stdlib itself on some interpreters, whatever the pool: they
# are skipped there, with the reason, and counted as skipped. (A hang cannot be an
# expected failure: it ends the run.)
STDLIB_HANGS = {
    # CPython gh-125451: the queue feeder thread, handling a task that fails to pickle,
    # waits for the pool's _shutdown_lock while the manager thread, holding it, joins the
    # feeder. A race, fixed in 3.12.8 and 3.13.1, that any test shutting a process pool
    # down while a task of it fails to pickle can lose. Seen here on 3.13.0 under load in
    # test_shutdown_deadlock_pickle and in test_processes_terminate (whose tasks are a
    # local function), with the stdlib's frames only, as the issue reports them.
    f"{module}.ProcessPool{method}{suffix}.{test}": (3, 12, 8)
    for module, suffix, test in (
        ("test_deadlock", "ExecutorDeadlockTest", "test_shutdown_deadlock_pickle"),
        ("test_shutdown", "ProcessPoolShutdownTest", "test_processes_terminate"),
    )
    for method in ("Fork", "Forkserver", "Spawn")
}


def fixed_in(release: tuple[int, int, int]) -> bool:
    """Whether this interpreter has the fix that came in ``release`` (or its branch's)."""
    here = sys.version_info[:3]
    if here[:2] == (3, 12):
        return here >= release
    if here[:2] == (3, 13):
        return here >= (3, 13, 1)
    return here[:2] > (3, 13)


def skip_stdlib_hangs(suite: unittest.TestSuite) -> None:
    """Mark the tests of `STDLIB_HANGS` skipped on an interpreter without the fix."""
    for test in iter_tests(suite):
        for name, release in STDLIB_HANGS.items():
            if test.id().endswith(name) and not fixed_in(release):
                reason = (f"hangs in the stdlib itself on Python {sys.version.split()[0]} "
                          "(CPython gh-125451, fixed in 3.12.8 and 3.13.1)")
                setattr(test, test._testMethodName,  # type: ignore[attr-defined]
                        unittest.skip(reason)(getattr(test, test._testMethodName)))


def iter_tests(suite: unittest.TestSuite):  # type: ignore[no-untyped-def]
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from iter_tests(item)
        else:
            yield item


def read_expected() -> dict[str, str]:
    expected = {}
    if not os.path.exists(EXPECTED):
        return expected
    with open(EXPECTED, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            test_id, _, reason = line.partition(" ")
            if not reason.strip():
                fatal(f"{EXPECTED}:{number}: {test_id} has no reason", 1)
            expected[test_id] = reason.strip()
    return expected


def base_id(test: unittest.TestCase) -> str:
    """A subtest's failure belongs to its test; a fixture's error to its own description."""
    parent = getattr(test, "test_case", None)
    return parent.id() if parent is not None else test.id()


def exception_line(trace: str) -> str:
    """The exception's own line in a formatted traceback: the first unindented line after
    the last "Traceback" header (an assertion's diff follows it; chained causes precede it)."""
    lines = trace.rstrip().splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback (")), default=-1)
    for line in lines[start + 1:]:
        if line.strip() and not line.startswith(" "):
            return line.strip()
    return lines[-1].strip() if lines else trace


class Result(unittest.TextTestResult):
    """Times each test; a test that outlasts the timeout ends the run (as regrtest's --timeout)."""

    def __init__(self, *args, timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self.started = 0.0
        self.timings: list[tuple[float, str]] = []

    def startTest(self, test):
        global current_test
        current_test = test.id()
        self.started = time.monotonic()
        # every thread's stack (the test's frames name it), then exit 1: children see EOF and go
        faulthandler.dump_traceback_later(self.timeout, exit=True)
        super().startTest(test)

    def stopTest(self, test):
        faulthandler.cancel_dump_traceback_later()
        self.timings.append((time.monotonic() - self.started, test.id()))
        super().stopTest(test)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stdlib", action="store_true", help="run the suite unchanged")
    parser.add_argument("--sdk", action="store_true",
                        help="install opentelemetry-sdk's TracerProvider first, so that process "
                             "and interpreter pools run their tasks through the relay")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds one test may take before the run fails (default 300)")
    parser.add_argument("patterns", nargs="*", help="run only tests whose id contains one of these")
    args = parser.parse_args()

    start = time.monotonic()
    swap = None
    if not args.stdlib:
        try:
            swap = swap_map()
        except ImportError as exc:
            fatal(f"propagate is not importable by {sys.executable}: {exc}")
    if args.sdk:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.trace import TracerProvider
        except ImportError as exc:
            fatal(f"--sdk needs opentelemetry-sdk: {exc}")
        trace.set_tracer_provider(TracerProvider())
    from test import support

    support.verbose = args.verbose  # regrtest's default is 0; test.support's own is 1
    modules = import_tests()
    watch_pools()
    changed = swap_in(modules, swap) if swap else []

    import propagate  # after the swap check above, so --stdlib names its version too
    print(f"cpython_futures: Python {sys.version.split()[0]} ({sys.executable}), {PACKAGE} from "
          f"{os.path.dirname(modules[0].__file__)}, "
          + ("the stdlib's pools (--stdlib)" if not swap else
             f"propagate {getattr(propagate, '__version__', '?')}'s pools "
             f"({os.path.dirname(propagate.__file__)})")
          + (", opentelemetry-sdk's TracerProvider installed" if args.sdk else ""), flush=True)
    for line in changed:
        print(f"  swapped {line}")

    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [f"*{p}*" for p in args.patterns]
    # the test_* modules of the package (not the package: its load_tests would load them
    # again), or the one module before 3.12
    test_modules = modules[1:] if hasattr(modules[0], "__path__") else modules
    test_modules = [m for m in test_modules if m.__name__.rsplit(".", 1)[-1].startswith("test_")]
    suite = unittest.TestSuite(loader.loadTestsFromModule(m) for m in test_modules)
    if suite.countTestCases() == 0:
        fatal("no test was selected", 1)
    skip_stdlib_hangs(suite)

    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=2 if args.verbose else 1,
                                     resultclass=functools.partial(Result, timeout=args.timeout))
    result = runner.run(suite)
    elapsed = time.monotonic() - start

    expected = read_expected()
    known, unexpected = [], []
    for test, text in result.failures + result.errors:
        (known if base_id(test) in expected else unexpected).append((test, text))
    unexpected += [(test, "unexpected success\n") for test in result.unexpectedSuccesses]
    failed_ids = {base_id(test) for test, _ in result.failures + result.errors}
    ran_ids = {test_id for _, test_id in result.timings}
    stale = [t for t in expected if t in ran_ids and t not in failed_ids]

    problems = verify(swap, bool(args.patterns))
    skipped = len(result.skipped)
    # a test counts once however many subtests failed; a class or module fixture's error
    # counts as a failure but ran no test
    failed = len({base_id(test) for test, _ in unexpected}) + len(stale)
    passed = (result.testsRun - skipped - len(failed_ids & ran_ids)
              - len(result.expectedFailures) - len(result.unexpectedSuccesses))

    print()
    print("cpython_futures: slowest tests: " + ", ".join(
        f"{test_id.removeprefix(PACKAGE + '.')} {seconds:.1f}s"
        for seconds, test_id in sorted(result.timings, reverse=True)[:5]))
    if result.skipped:
        reasons: dict[str, int] = {}
        for _, reason in result.skipped:
            reasons[reason] = reasons.get(reason, 0) + 1
        print("cpython_futures: skip reasons: " + "; ".join(
            f"{count}x {reason}" for reason, count in sorted(reasons.items(), key=lambda r: -r[1])))
    for test, _ in known:
        print(f"cpython_futures: known failure {base_id(test)}: {expected[base_id(test)]}")
    for test_id in stale:
        print(f"cpython_futures: FAIL: {test_id} is in {os.path.basename(EXPECTED)} but passed: "
              "take it off the list")
    for test, text in unexpected:
        print(f"cpython_futures: FAIL: {test.id()}: {exception_line(text)}")
    print(f"cpython_futures: {len(made)} pools made by tests ("
          + ", ".join(sorted({f'{c.__module__}.{c.__qualname__}' for _, _, c, _ in made}))
          + f"); {len(rewritten_scripts)} child scripts rewritten")
    for problem in problems:
        print(f"cpython_futures: FAIL: swap not verified: {problem}")
    mode = ("propagate" if swap else "stdlib") + (" with --sdk" if args.sdk else "")
    print(f"cpython_futures: {mode}, Python {sys.version.split()[0]}, "
          f"{result.testsRun} ran in {elapsed:.0f}s, {len(known)} known failures")
    print(f"cpython_futures: {passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 1 if failed or problems or result.testsRun == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
