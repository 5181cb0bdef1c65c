"""A bounded number of slots for pending work, and a fair line of sync and async waiters.

`propagate.dns` holds each lookup, running or queued, in a slot, so that many slow lookups
cannot grow memory without bound. A caller that finds every slot taken waits in line:
the async form without blocking its event loop, the sync form on its own thread.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable


class Slots:
    """``size`` slots for lookups running or queued, and a line of callers waiting for one.

    A freed slot goes to the first caller in line, sync or async, so a caller cannot be
    overtaken for ever by newcomers. Each caller in line is an *offer*: a callable that
    hands it the slot and returns False if that caller is gone (its loop is closed).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._line: collections.deque[Callable[[], bool]] = collections.deque()
        self._lock = threading.Lock()

    @property
    def taken(self) -> int:
        return self.size - self._free

    def give(self, _: object = None) -> None:
        """Free a slot: hand it to the first caller in line still waiting, or count it free."""
        while True:
            with self._lock:
                if not self._line:
                    self._free += 1
                    return
                offer = self._line.popleft()  # the slot is that caller's from here on
            if offer():  # outside the lock: waking a loop is a system call
                return

    def take_now(self) -> bool:
        """Take a free slot if there is one and nobody is in line."""
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return True
            return False

    def take(self, timeout: float | None) -> bool:
        """Take a slot, blocking this thread for up to ``timeout``; False if none came."""
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return True
            turn = threading.Event()
            offer = _wake(turn)
            self._line.append(offer)
        try:
            turn.wait(timeout)
        except BaseException:
            if not self._leave(offer):
                self.give()  # handed over as we were interrupted
            raise
        return not self._leave(offer)  # a slot that came as we gave up is kept

    async def take_async(self, timeout: float | None) -> bool:
        """Take a slot, not blocking the loop, for up to ``timeout``; False if none came."""
        with self._lock:
            if self._free and not self._line:
                self._free -= 1
                return True
            loop = asyncio.get_running_loop()
            turn: asyncio.Future[None] = loop.create_future()
            offer = _schedule(loop, self._accept, turn)
            self._line.append(offer)
        try:
            if timeout is None:
                await turn
            else:
                await asyncio.wait((turn,), timeout=timeout)
        except BaseException:  # cancelled
            if self._withdraw(turn, offer):
                self.give()
            raise
        return self._withdraw(turn, offer)

    def _accept(self, turn: asyncio.Future[None]) -> None:
        """On the waiter's loop: take the slot offered, or give it back if the waiter left."""
        if turn.cancelled():
            self.give()
        else:
            turn.set_result(None)

    def _withdraw(self, turn: asyncio.Future[None], offer: Callable[[], bool]) -> bool:
        """Stop waiting on a loop; True if the slot had already been accepted."""
        if turn.cancel():  # not accepted: an offer still on its way gives the slot back
            self._leave(offer)
            return False
        return True

    def _leave(self, offer: Callable[[], bool]) -> bool:
        """Step out of line; False if the offer was already made (the slot is ours)."""
        with self._lock:
            try:
                self._line.remove(offer)
            except ValueError:
                return False
            return True


def _wake(turn: threading.Event) -> Callable[[], bool]:
    def offer() -> bool:
        turn.set()
        return True

    return offer


def _schedule(loop: asyncio.AbstractEventLoop, accept: Callable[[asyncio.Future[None]], None],
              turn: asyncio.Future[None]) -> Callable[[], bool]:
    def offer() -> bool:
        try:
            loop.call_soon_threadsafe(accept, turn)
        except RuntimeError:  # the loop is closed: that caller is gone
            return False
        return True

    return offer
