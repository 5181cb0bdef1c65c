"""Blocking DNS lookups off the event loop, with the caller's span: `Resolver`, `getaddrinfo`.

``socket.getaddrinfo`` blocks, so asyncio runs it in a thread pool (``loop.getaddrinfo``,
aiohttp's ``ThreadedResolver``), and the caller's span is lost there. hyper (Rust) kept a
DNS span by entering the caller's span on the blocking thread and exiting it there; under
per-task subscribers that panicked, and hyper deleted the span (hyper-util #134, #153 and
#179; hyper #3848, #3870). Here the caller's context crosses as a snapshot, nothing of the
caller's is entered or exited on the lookup thread, and each lookup's own ``dns.lookup``
span is started, made current and ended on the lookup thread.

**The cap.** A `Resolver` holds at most ``max_pending`` lookups, running or queued. A
lookup that finds every slot taken waits in line, first come first served: the async form
without blocking the event loop, the blocking form on its own thread; the resolver's
``timeout`` counts that wait. A lookup whose caller gave up (timeout, cancellation) cannot
be stopped, so it keeps its slot until it finishes: callers that give up and retry never
pile up work, and memory stays bounded by ``max_pending`` lookups plus the callers that are
themselves waiting. A caller that gives up while still in line takes no slot with it, and
a slot on its way to a coroutine whose event loop stops or closes goes on to the next
caller (``propagate/_slots.py`` says exactly when).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import contextlib
import errno
import functools
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from . import _otel
from ._errors import PropagateError
from ._slots import Slots
from ._thread import ThreadPoolExecutor

# At run time too, so that typing.get_type_hints() can read the signatures below.
Host: TypeAlias = bytes | str | None
Port: TypeAlias = bytes | str | int | None
# family, type, proto, canonname, sockaddr: what socket.getaddrinfo returns
AddrInfo: TypeAlias = tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]
GetAddrInfo: TypeAlias = Callable[[Host, Port, int, int, int, int], Sequence[AddrInfo]]

if sys.version_info >= (3, 11):
    from typing import Self
else:
    from typing_extensions import Self

if TYPE_CHECKING:
    from ._aiohttp import AiohttpResolver

__all__ = ["AiohttpResolver", "LookupTimeout", "Resolver", "getaddrinfo", "resolve"]

T = TypeVar("T")
_TRACER = _otel.get_tracer("propagate.dns")


if sys.version_info >= (3, 11):
    class _AnyTimeout(TimeoutError):
        """asyncio's and concurrent.futures' TimeoutError are the builtin one."""
else:
    class _AnyTimeout(asyncio.TimeoutError, cf.TimeoutError, TimeoutError):
        """Three distinct TimeoutErrors before 3.11: be all of them, so every ``except`` works."""


class LookupTimeout(PropagateError, _AnyTimeout):
    """A lookup took longer than its resolver's ``timeout`` (waiting for a slot included).

    A `TimeoutError` (an `OSError`, with ``errno.ETIMEDOUT``); on Python 3.10 also
    an ``asyncio.TimeoutError`` and a ``concurrent.futures.TimeoutError``. The lookup itself
    goes on, on its lookup thread, and its span ends there.
    """


def _settle(slots: Slots, loop: asyncio.AbstractEventLoop, answer: asyncio.Future[T],
            done: cf.Future[T]) -> None:
    """A lookup's done callback: free its slot, then pass its outcome to the waiting loop."""
    slots.give()
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for this
        loop.call_soon_threadsafe(_copy, done, answer)


def _copy(done: cf.Future[T], answer: asyncio.Future[T]) -> None:
    if answer.cancelled():  # the caller timed out or was cancelled
        return
    exc = done.exception()
    if exc is None:
        answer.set_result(done.result())
    else:
        answer.set_exception(exc)


class _Verdict:
    """Which came first, a lookup's answer or its caller's deadline: the span says which."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._answered = False
        self._late: LookupTimeout | None = None

    def answered(self) -> LookupTimeout | None:
        """On the lookup thread, before its span ends: the timeout its caller gave up with."""
        with self._lock:
            self._answered = True
            return self._late

    def too_late(self, late: LookupTimeout) -> bool:
        """The caller's time is up: False if the answer came first (the caller takes it)."""
        with self._lock:
            if self._answered:
                return False
            self._late = late
            return True


def _lookup(getaddrinfo: GetAddrInfo, verdict: _Verdict | None, host: Host, port: Port,
            family: int, type: int, proto: int, flags: int) -> list[AddrInfo]:
    """On a lookup thread, in the caller's snapshot: the span is entered and exited here.

    A lookup that answers after its caller gave up has the caller's error as its status
    (the lookup's own, if any, stays an event).
    """
    span = _otel.start("dns.lookup", _TRACER, attributes=_question(host, port))
    with _otel.running(span, None if verdict is None else verdict.answered):
        infos = list(getaddrinfo(host, port, family, type, proto, flags))
        if span.is_recording():
            span.set_attributes({
                "dns.answer.count": len(infos),
                "dns.answers": list(dict.fromkeys(str(info[4][0]) for info in infos)),
            })
        return infos


def _question(host: Host, port: Port) -> dict[str, _otel.AttributeValue]:
    attributes: dict[str, _otel.AttributeValue] = {
        "thread.name": threading.current_thread().name,
        "thread.id": threading.get_native_id(),
    }
    if host is not None:
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        attributes["dns.question.name"] = name
    if port is not None:
        service = port.decode("ascii", "replace") if isinstance(port, bytes) else port
        numeric = isinstance(service, int) or service.isdigit()
        attributes["server.port"] = int(service) if numeric else service
    return attributes


class Resolver:
    """Like ``loop.getaddrinfo``, but in the caller's context, with a span, a timeout and a cap.

    Lookups run on this resolver's own pool of ``max_workers`` threads, named
    ``propagate-dns_N`` (by default as many as the stdlib's pools have), each in a
    snapshot of the caller's context. Each lookup makes a ``dns.lookup`` span, a child of
    the caller's span, started and ended on the lookup thread, with ``dns.question.name``,
    ``server.port`` (the port asked about; a service name stays a string),
    ``dns.answer.count`` (entries returned), ``dns.answers`` (distinct addresses),
    ``thread.name`` and ``thread.id``; a failed lookup's span records the error and has
    status ERROR, and so has the span of a lookup whose caller timed out
    (``LookupTimeout: ...``). Errors reach the caller unchanged.

    ``timeout`` (seconds, None for none) bounds each call, waiting for a slot included,
    and raises `LookupTimeout`. At most ``max_pending`` lookups (default ``8 *
    max_workers``) run or wait in the queue at once; further callers wait their turn (see
    the module documentation). ``getaddrinfo`` is the blocking function to call, with
    ``socket.getaddrinfo``'s signature. ``close()`` (or leaving a ``with`` block) stops
    new lookups.
    """

    def __init__(self, max_workers: int | None = None, timeout: float | None = None,
                 getaddrinfo: GetAddrInfo = socket.getaddrinfo, *,
                 max_pending: int | None = None) -> None:
        if max_workers is None:
            max_workers = min(32, (os.cpu_count() or 1) + 4)  # the stdlib pools' default
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        if max_pending is None:
            max_pending = 8 * max_workers
        if max_pending <= 0:
            raise ValueError("max_pending must be greater than 0")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be None or greater than 0, not {timeout!r}")
        if not callable(getaddrinfo):
            raise TypeError(f"getaddrinfo must be callable, not {getaddrinfo!r}")
        self.timeout = timeout
        self.max_pending = max_pending
        self._getaddrinfo = getaddrinfo
        self._slots = Slots(max_pending)
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="propagate-dns")
        self._closed = False

    @property
    def pending(self) -> int:
        """Slots taken now (at most ``max_pending``): lookups running or queued, and slots on
        their way to a caller in line. Reading it takes back a slot stranded on a stopped loop.
        """
        return self._slots.taken

    async def getaddrinfo(self, host: Host, port: Port, family: int = 0, type: int = 0,
                          proto: int = 0, flags: int = 0) -> list[AddrInfo]:
        """Like ``loop.getaddrinfo``, but through this resolver, in the caller's context.

        Cancelling the caller, or timing out, leaves the lookup running on its thread:
        its span ends there when it finishes.
        """
        self._check_open()
        deadline = self._deadline()
        if not (self._slots.take_now() or await self._slots.take_async(self._left(deadline))):
            raise self._no_slot(host)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[AddrInfo]] = loop.create_future()
        verdict = None if deadline is None else _Verdict()
        # cancelling ``answer`` (the caller gave up) leaves the lookup alone
        self._submit(verdict, (host, port, family, type, proto, flags),
                     functools.partial(_settle, self._slots, loop, answer))
        if verdict is None:
            return await answer  # cancelling the caller cancels ``answer`` only
        try:
            # not ``await answer``: the finally below must not wake a task on a closed loop
            await asyncio.wait((answer,), timeout=self._left(deadline))
            if not answer.done():
                self._time_up(verdict, host)
                await asyncio.wait((answer,))  # answered as time ran out: on its way
            return answer.result()
        finally:
            answer.cancel()  # a no-op once answered; else the lookup goes on, unheard (_copy)

    def resolve(self, host: Host, port: Port, family: int = 0, type: int = 0, proto: int = 0,
                flags: int = 0) -> list[AddrInfo]:
        """Like ``socket.getaddrinfo``, but through this resolver: the blocking form.

        Blocks the calling thread while waiting for a slot and for the answer; do not
        call it on an event loop.
        """
        self._check_open()
        deadline = self._deadline()
        if not self._slots.take(self._left(deadline)):
            raise self._no_slot(host)
        verdict = None if deadline is None else _Verdict()
        future = self._submit(verdict, (host, port, family, type, proto, flags),
                              self._slots.give)
        if verdict is not None and not cf.wait((future,), self._left(deadline)).done:
            self._time_up(verdict, host)
        return future.result()  # if answered as time ran out: as soon as its span has ended

    def close(self, wait: bool = True) -> None:
        """Refuse new lookups; those running or queued still finish (``wait``: block until then)."""
        self._closed = True
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.pending}/{self.max_pending} pending"
        return f"<propagate.dns.Resolver {state}, timeout={self.timeout!r}>"

    def _submit(self, verdict: _Verdict | None, question: tuple[Host, Port, int, int, int, int],
                done: Callable[[cf.Future[list[AddrInfo]]], object]) -> cf.Future[list[AddrInfo]]:
        """Queue a lookup for a slot already taken; ``done`` must give the slot back."""
        try:
            self._check_open()
            future = self._pool.submit(_lookup, self._getaddrinfo, verdict, *question)
        except BaseException:
            self._slots.give()
            self._check_open()  # closed between the check and submit: say so, not the pool
            raise
        future.add_done_callback(done)
        return future

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"cannot resolve after close(): {self!r}")

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _time_up(self, verdict: _Verdict, host: Host) -> None:
        """Raise `LookupTimeout`, and mark the lookup's span, unless the answer came first."""
        late = LookupTimeout(errno.ETIMEDOUT,
                             f"lookup of {host!r} took longer than {self.timeout} s")
        if verdict.too_late(late):
            raise late

    def _no_slot(self, host: Host) -> LookupTimeout:
        return LookupTimeout(errno.ETIMEDOUT, f"lookup of {host!r} waited {self.timeout} s for "
                             f"one of {self.max_pending} slots, all taken by slower lookups")


_default: Resolver | None = None
_default_lock = threading.Lock()


def _default_resolver() -> Resolver:
    """The module's resolver, made on first use and closed at interpreter exit."""
    global _default
    resolver = _default
    if resolver is None:
        with _default_lock:
            resolver = _default
            if resolver is None:
                resolver = _default = Resolver()
    return resolver


@atexit.register
def _close_default() -> None:
    global _default
    resolver, _default = _default, None
    if resolver is not None:
        resolver.close(wait=False)


def _forget_default() -> None:
    """In a forked child: the parent's lookup threads do not exist here, so start afresh."""
    global _default, _default_lock
    _default, _default_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_default)


async def getaddrinfo(host: Host, port: Port, family: int = 0, type: int = 0, proto: int = 0,
                      flags: int = 0) -> list[AddrInfo]:
    """Like ``loop.getaddrinfo``, but in the caller's context, with a ``dns.lookup`` span.

    Uses the module's default `Resolver`, made on first use and closed at exit.
    """
    return await _default_resolver().getaddrinfo(host, port, family, type, proto, flags)


def resolve(host: Host, port: Port, family: int = 0, type: int = 0, proto: int = 0,
            flags: int = 0) -> list[AddrInfo]:
    """Like ``socket.getaddrinfo``, but on a lookup thread with a ``dns.lookup`` span.

    Uses the module's default `Resolver`, made on first use and closed at exit.
    """
    return _default_resolver().resolve(host, port, family, type, proto, flags)


def __getattr__(name: str) -> Any:
    """``AiohttpResolver`` lives in ``_aiohttp``, imported on first use: aiohttp is heavy."""
    if name == "AiohttpResolver":
        from ._aiohttp import AiohttpResolver

        return AiohttpResolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "AiohttpResolver"])
