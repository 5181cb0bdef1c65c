"""A thread-affine OpenTelemetry runtime context: ``OTEL_PYTHON_CONTEXT=propagate``.

OpenTelemetry keeps the current context in one ContextVar, and ``detach(token)`` resets
it with the token ``attach`` returned. In any Context but the one that attached, the
reset fails: the API logs "Failed to detach context", and the entering Context is left
with the attached context (a span that has ended) as its current one, so the next spans
there get the wrong parent (opentelemetry-python #2606). Instrumentations whose spans
live in generators or streaming responses closed in another task or thread hit this.

This runtime behaves as OpenTelemetry's default one, except at such a foreign detach:

* nothing is raised or logged; the detach is remembered (an *orphan*);
* the entering Context is **healed** at its next use of the context API (``get_current``
  or ``attach``, which every span start makes): if its current context is still the one
  the orphaned token attached, it goes back to what it was before that attach, as the
  detach would have done there. If something was attached over it in the meantime, that
  is left alone, and the orphan heals once it is detached. This is `propagate.span`'s
  rule too, and both follow `propagate._heal`;
* an orphan whose entering Context can never run again (nothing but the orphan's token
  refers to it) is dropped at the next foreign detach, and at most `MAX_ORPHANS` wait.

A contextvars Token does not say which value it set, and "still the one attached" needs
to know: a token here is ``(Token, context)``. That tuple is the runtime's whole cost
until a foreign detach (``get_current`` is the ContextVar's own method, which spares a
Python frame); only while an orphan waits do ``attach`` and ``get_current`` check for it.

What it cannot fix: the span itself was ended where the foreign exit happened, at that
time; and a Context that never uses the context API again keeps the ended span current
(nothing reads it there either).

OpenTelemetry loads this module while ``opentelemetry.context`` is still half imported,
so it imports nothing of OpenTelemetry but ``opentelemetry.context.context``, and
nothing of propagate but `propagate._heal` (importing ``propagate`` itself loads only its
errors and version).
"""

from __future__ import annotations

import gc
import sys
import threading
from contextvars import Context as _VarsContext
from contextvars import ContextVar, Token
from typing import Any

from opentelemetry.context.context import Context, _RuntimeContext

from ._heal import reset_here, undo

MAX_ORPHANS = 64
"""At most this many foreign detaches wait to heal; beyond it the oldest is forgotten."""


# A token, as this runtime hands it out: the contextvars Token and the context it set.
Attached = tuple[Token[Context], Context]


class _Orphan:
    """A detach made in a Context other than the one that attached."""

    __slots__ = ("attached", "token", "where")

    def __init__(self, token: Token[Context], attached: Context,
                 where: _VarsContext | None) -> None:
        self.token = token
        self.attached = attached  # what the attach made current: undone only while it is
        self.where = where  # the Context the token was made in (found by the collector)

    def reset(self) -> bool:
        return reset_here(self.token)


class RuntimeContext(_RuntimeContext):
    """OpenTelemetry's ``contextvars`` runtime, where a detach in a foreign Context is safe.

    Registered as the ``opentelemetry_context`` entry point ``propagate``: set
    ``OTEL_PYTHON_CONTEXT=propagate`` before OpenTelemetry is imported. See the module
    documentation for what happens at a foreign detach.
    """

    _CONTEXT_KEY = "current_context"

    def __init__(self) -> None:
        var: ContextVar[Context] = ContextVar(self._CONTEXT_KEY,
                                              default=Context())  # noqa: B039 (never changed)
        self._current_context = var
        self._orphans: list[_Orphan] = []  # oldest first; replaced, never changed in place
        self._generation = 0  # counts foreign detaches
        # In each Context, the generation and current context it was last checked at: it
        # is checked again only after another foreign detach, or once that context changed.
        self._checked: ContextVar[tuple[int, Context] | None] = ContextVar(
            "propagate.runtime.checked", default=None)
        self._lock = threading.Lock()
        self._heals = False
        # The ContextVar's own methods, bound here, in __init__ (where the interpreter
        # learns the instance's attributes): get_current needs no Python frame at all,
        # attach and detach no method lookup.
        self.get_current = var.get  # type: ignore[method-assign]
        self._set = var.set
        self._reset = var.reset

    def attach(self, context: Context) -> Attached:  # type: ignore[override]
        """Make ``context`` current; the token says which context it set."""
        return self._set(context), context

    def get_current(self) -> Context:
        """The current context (replaced per instance by the ContextVar's ``get``)."""
        return self._current_context.get()

    def detach(self, token: Attached) -> None:  # type: ignore[override]
        """Reset to what was current before ``token``'s attach; elsewhere, remember it."""
        try:
            self._reset(token[0])
        except ValueError:  # made in another Context: heal that one at its next use
            self._orphan(token)

    # -- while orphans wait ------------------------------------------------------------

    def _healing(self) -> None:
        self._heals = True
        self.attach = self._healing_attach  # type: ignore[method-assign]
        self.get_current = self._healing_get_current  # type: ignore[method-assign]

    def _fast(self) -> None:
        if self._heals:
            self._heals = False
            del self.attach
            self.get_current = self._current_context.get  # type: ignore[method-assign]

    def _healing_get_current(self) -> Context:
        current = self._current_context.get()
        checked = self._checked.get()
        if checked is None or checked[0] != self._generation or checked[1] is not current:
            current = self._heal(current)
        return current

    def _healing_attach(self, context: Context) -> Attached:
        self._healing_get_current()
        return self._current_context.set(context), context

    def _orphan(self, attached: Attached) -> None:
        token, context = attached
        orphan = _Orphan(token, context, _entering_context(token))
        with self._lock:
            orphans = [*self._live_orphans(), orphan]
            del orphans[:-MAX_ORPHANS]
            self._orphans = orphans
            self._generation += 1
            self._healing()

    def _heal(self, current: Context) -> Context:
        """In the Context calling: undo the orphaned attaches made here that are current
        (`propagate._heal.undo`), then mark it checked. Returns the current context."""
        undone = undo(self._orphans, self._current_context.get)  # a snapshot
        if undone:
            self._forget(undone)
            current = self._current_context.get()
        else:
            self._sweep()
        self._checked.set((self._generation, current))
        return current

    def _forget(self, undone: list[_Orphan]) -> None:
        with self._lock:
            self._orphans = [o for o in self._orphans if o not in undone]
            if not self._orphans:
                self._fast()

    def _sweep(self) -> None:
        """Forget the orphans whose Context can never run again."""
        with self._lock:
            orphans = self._live_orphans()
            if len(orphans) < len(self._orphans):
                self._orphans = orphans
                if not orphans:
                    self._fast()

    def _live_orphans(self) -> list[_Orphan]:
        """The orphans whose Context something else still refers to: it may run again."""
        holders: dict[int, int] = {}
        for orphan in self._orphans:  # each refers to its Context twice: token and record
            holders[id(orphan.where)] = holders.get(id(orphan.where), 0) + 2
        return [o for o in self._orphans
                if o.where is None or _references(o.where) > holders[id(o.where)]]


def _entering_context(token: Token[Any]) -> _VarsContext | None:
    """The Context ``token`` was made in: a Token holds it, and lists it to the collector."""
    for referent in gc.get_referents(token):
        if type(referent) is _VarsContext:
            return referent
    return None


def _references(obj: object) -> int:
    """How many references to ``obj`` there are, not counting those a call written
    ``_references(x.y)`` makes itself (measured once, below: interpreters differ, 3.14
    borrows references where 3.12 takes them)."""
    return sys.getrefcount(obj) - _CALL


class _Held:
    __slots__ = ("where",)

    def __init__(self) -> None:
        self.where = object()  # held once, by this


def _call_references() -> int:
    held = _Held()
    return _references(held.where) - 1


_CALL = 0
_CALL = _call_references()
