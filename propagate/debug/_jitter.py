"""Seeded random sleeps at propagate's switch points, to widen the races tests rarely hit."""

from __future__ import annotations

import math
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from .. import _switch

POINTS = ("capture", "attach", "detach", "task-start", "task-end")

class Jitter:
    """The switch-point hook `jitter` installs: seeded sleeps, and counts to prove it fired.

    One ``random.Random(seed)`` draws every decision under a lock, so a given seed gives
    the same sequence of sleeps for the same order of calls.
    """

    def __init__(self, seed: int | str, probability: float, max_delay: float) -> None:
        if not 0.0 <= probability <= 1.0:  # also refuses NaN
            raise ValueError(f"probability must be between 0 and 1, not {probability!r}")
        if not (max_delay >= 0.0 and math.isfinite(max_delay)):
            raise ValueError(f"max_delay must be a finite number of seconds >= 0, "
                             f"not {max_delay!r}")
        self.seed: int | str = seed
        """The seed given: the same seed makes the same choices at the same points."""
        self.probability: float = probability
        """The chance of a sleep at each point, from 0 to 1."""
        self.max_delay: float = max_delay
        """The longest sleep, in seconds."""
        self.counts: dict[str, int] = dict.fromkeys(POINTS, 0)
        """How many times each switch point was reached."""
        self.delays: int = 0
        """How many sleeps were injected."""
        self.slept: float = 0.0
        """Their total, in seconds."""
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        _jitters.add(self)

    def __call__(self, point: str) -> None:
        with self._lock:
            self.counts[point] = self.counts.get(point, 0) + 1
            if self._random.random() >= self.probability:
                return
            delay = self._random.uniform(0.0, self.max_delay)
            self.delays += 1
            self.slept += delay
        time.sleep(delay)  # outside the lock: the point is to let other threads run

    def __repr__(self) -> str:
        return (f"<Jitter seed={self.seed!r} probability={self.probability} "
                f"max_delay={self.max_delay} delays={self.delays} counts={self.counts}>")


_jitters: weakref.WeakSet[Jitter] = weakref.WeakSet()
_active: list[Jitter] = []  # the jitter blocks running now, oldest first
_active_lock = threading.Lock()


def _unlock_in_child() -> None:
    # A thread of the parent may have held a lock at fork: the child would wait forever.
    global _active_lock
    _active_lock = threading.Lock()
    for hook in list(_jitters):
        hook._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_unlock_in_child)


@contextmanager
def jitter(seed: int | str = 0, probability: float = 0.5,
           max_delay: float = 0.001) -> Iterator[Jitter]:
    """Sleep at random at propagate's switch points while the block runs; yield the `Jitter`.

    At each point (``capture``, ``attach``, ``detach``, ``task-start``, ``task-end``),
    in any thread of this process, sleep with ``probability`` for a time drawn uniformly
    from ``[0, max_delay]`` seconds. The draws come from ``random.Random(seed)``, so a
    seed replays the same decisions for the same order of calls. Nested blocks replace
    the outer hook and restore it on exit. Worker processes started by fork while the
    block runs inherit it (their counts stay in the worker).
    """
    hook = Jitter(seed, probability, max_delay)
    with _active_lock:  # blocks may end in any order, in any thread: the newest stays active
        _active.append(hook)
        _switch.hook = hook
    try:
        yield hook
    finally:
        with _active_lock:
            _active.remove(hook)
            _switch.hook = _active[-1] if _active else None
