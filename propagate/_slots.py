"""A bounded number of slots for pending work, and a fair line of sync and async waiters.

`propagate.dns` holds each lookup, running or queued, in a slot, so that many slow lookups
cannot grow memory without bound. A caller that finds every slot taken waits in line:
the async form without blocking its event loop, the sync form on its own thread.

Every slot is in exactly one place: free, offered to one caller (taken out of the line),
or held by one caller (from taking it until its lookup is done). A caller's state changes
only under the lock, so a caller that gives up (timeout, cancellation, its coroutine
closed) learns there, once, whether a slot came first: it then uses the slot or gives it
back. A slot offered to a coroutine is the coroutine's only when the coroutine runs again,
and its loop may stop (or close) first, and never run it: see `Slots`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import weakref
from collections.abc import Callable
from typing import TypeVar

LINE, OFFERED, PASSED, GONE = "line", "offered", "passed over", "gone"


class _Waiter:
    """A caller waiting for a slot; ``state`` changes only under its `Slots`' lock.

    ``turn`` only wakes the caller, which then reads ``state``: never whether ``turn`` is
    done or cancelled, because cancelling a task cancels the future it awaits as well, and
    the caller's deadline sets it too.
    """

    state = LINE

    def running(self) -> bool:
        """Whether this caller can run now, to take a slot offered."""
        raise NotImplementedError

    def wake(self) -> bool:
        """Tell the caller its slot is there; False if it is gone (its loop is closed)."""
        raise NotImplementedError


class _Thread(_Waiter):
    """A thread in ``take()``: it always wakes, so a slot offered to it is never stranded."""

    def __init__(self) -> None:
        self.turn = threading.Event()

    def running(self) -> bool:
        return True

    def wake(self) -> bool:
        self.turn.set()
        return True


class _Task(_Waiter):
    """A coroutine in ``take_async()``, woken through its own loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.turn: asyncio.Future[None] = loop.create_future()

    def running(self) -> bool:
        return self.loop.is_running()

    def wake(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(_set, self.turn)
        except RuntimeError:  # the loop is closed: that caller is gone
            return False
        return True


W = TypeVar("W", bound=_Waiter)


class Slots:
    """``size`` slots for lookups running or queued, and a line of callers waiting for one.

    A freed slot goes to the first caller in line, sync or async, so a caller cannot be
    overtaken for ever by newcomers.

    A slot offered to a coroutine whose loop is not running (stopped, or closed) before
    the coroutine took it goes back, and on to the next caller in line: at once if the
    loop is not running when the slot is offered; otherwise when the next caller arrives
    or ``taken`` is read, and in any case within ``recheck`` seconds while other callers
    wait (a thread in line looks that often, and so does each loop with callers in line).
    That coroutine, if its loop runs again, goes back to the head of the line, or takes a
    free slot. A coroutine closed with its loop (``GeneratorExit``) gives back what it holds.
    """

    recheck = 1.0  # seconds: how often callers in line look for a slot stranded on a stopped loop

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._line: collections.deque[_Waiter] = collections.deque()
        self._offered: set[_Waiter] = set()  # offered a slot, and not yet back to take it
        self._watching: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        """Slots taken now; a slot stranded on a loop that is not running is taken back first."""
        self._recover()
        return self.size - self._free

    def give(self, _: object = None) -> None:
        """Free a slot: offer it to the first caller in line, or count it free."""
        self._hand_on(1)

    def take_now(self) -> bool:
        """Take a free slot if there is one and nobody is in line."""
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return True
            return False

    def take(self, timeout: float | None) -> bool:
        """Take a slot, blocking this thread for up to ``timeout``; False if none came."""
        deadline = _deadline(timeout)
        waiter = self._join(_Thread)
        while waiter is not None:
            try:
                waiter.turn.wait(self._pause(deadline))
            except BaseException:
                self._quit(waiter)
                raise
            if waiter.state is not LINE or _left(deadline) == 0:
                return self._leave(waiter)  # a slot that came as we gave up is kept
            self._recover()
        return True

    async def take_async(self, timeout: float | None) -> bool:
        """Take a slot, not blocking the loop, for up to ``timeout``; False if none came."""
        deadline = _deadline(timeout)
        loop = asyncio.get_running_loop()
        waiter = self._join(lambda: _Task(loop))
        while waiter is not None:
            self._watch(loop)
            left = _left(deadline)
            alarm = None if left is None else loop.call_later(left, _set, waiter.turn)
            try:
                await waiter.turn
            except BaseException:  # cancelled, or closed with its loop
                self._quit(waiter)
                raise
            finally:
                if alarm is not None:
                    alarm.cancel()
            if waiter.state is PASSED:  # its loop stopped with the slot offered: line up again
                waiter = self._join(lambda: _Task(loop), first=True)
            elif _left(deadline) == 0 or not self._rearm(waiter):
                return self._leave(waiter)
        return True

    def _join(self, make: Callable[[], W], first: bool = False) -> W | None:
        """Take a free slot (None), or get in line, at its end or (``first``) its head."""
        self._recover()  # a stranded slot goes to those already in line
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return None
            waiter = make()
            if first:
                self._line.appendleft(waiter)
            else:
                self._line.append(waiter)
            return waiter

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Have ``loop`` look for stranded slots every ``recheck`` s while it has callers in line.

        One timer per loop, not one per caller: a timer per wait costs more than the wait.
        """
        with self._lock:
            if loop in self._watching:
                return
            self._watching.add(loop)
        loop.call_later(self.recheck, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._recover()
        with self._lock:
            if not any(isinstance(w, _Task) and w.loop is loop for w in self._line):
                self._watching.discard(loop)
                return
        loop.call_later(self.recheck, self._tick, loop)

    def _rearm(self, waiter: _Task) -> bool:
        """A new ``turn`` to wait on, if still in line (an offer reads it only once offered)."""
        with self._lock:
            if waiter.state is LINE:
                waiter.turn = waiter.loop.create_future()
            return waiter.state is LINE

    def _leave(self, waiter: _Waiter) -> bool:
        """Stop waiting, for good; True if a slot was offered first (the caller's now)."""
        with self._lock:
            if waiter.state is LINE:
                self._line.remove(waiter)
            self._offered.discard(waiter)
            offered, waiter.state = waiter.state is OFFERED, GONE
        return offered

    def _quit(self, waiter: _Waiter) -> None:
        """Stop waiting on an exception: a slot offered as it came goes on to the next."""
        if self._leave(waiter):
            self.give()

    def _recover(self) -> None:
        """Offer the slots stranded on loops that are not running to the line."""
        self._hand_on(self._reclaim())

    def _hand_on(self, slots: int) -> None:
        """Offer ``slots`` freed slots to the line: to callers that can take them now."""
        while slots:
            waiter = self._next()
            if waiter is None or (waiter.wake() and waiter.running()) or not self._pass(waiter):
                slots -= 1  # counted free, offered, or gone on with the caller it was offered to

    def _next(self) -> _Waiter | None:
        """Offer a slot to the first caller in line; None if nobody is (the slot is free)."""
        with self._lock:
            if not self._line:
                self._free += 1
                return None
            waiter = self._line.popleft()
            waiter.state = OFFERED
            self._offered.add(waiter)
            return waiter

    def _pass(self, waiter: _Waiter) -> bool:
        """Take back the slot offered to a caller whose loop is not running (stopped, closed).

        False if it is too late: the caller took the slot, or another thread passed it on.
        """
        with self._lock:
            if waiter.state is not OFFERED:
                return False
            self._offered.discard(waiter)
            waiter.state = PASSED
            return True

    def _reclaim(self) -> int:
        """Take back the slots offered to callers that cannot run now; how many."""
        if not self._offered:  # the common case, without the lock: a racing offer checks itself
            return 0
        with self._lock:
            stranded = [w for w in self._offered if not w.running()]
            for waiter in stranded:
                waiter.state = PASSED
            self._offered.difference_update(stranded)
        return len(stranded)

    def _pause(self, deadline: float | None) -> float:
        left = _left(deadline)
        return self.recheck if left is None else min(left, self.recheck)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _set(turn: asyncio.Future[None]) -> None:
    if not turn.done():  # a task cancelled while the offer was on its way
        turn.set_result(None)
