"""Healing: the one rule for an attach whose detach happened in another Context.

A contextvars Token resets only in the Context that made it, so a scope exited on
another thread or in another task cannot restore the Context that entered it: its
attach can only be undone later, from inside that Context. Two places do this, and both
follow this module (docs/design.md, "Healing"):

* `propagate.span`, for the scopes propagate opened: at the entering thread's next
  propagate call, and it also ends the span there;
* the runtime context (``OTEL_PYTHON_CONTEXT=propagate``), for any scope: at the
  entering Context's next use of OpenTelemetry's context API.

The rule: an orphaned attach is undone only in the Context that made it, only while
what it attached is still the current context there (something attached over it since
stays until it is detached), and innermost first (undoing one may make the one it was
attached over current, which is then undone too).

OpenTelemetry loads the runtime context while ``opentelemetry.context`` is half
imported, so this module imports nothing of OpenTelemetry's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import Token
from typing import Any, Protocol, TypeVar


class Orphan(Protocol):
    """An attach whose detach happened in another Context."""

    @property
    def attached(self) -> object:
        """The context the attach made current."""

    def reset(self) -> bool:
        """Undo the attach if this is the Context that made it; True if this is it."""


OrphanT = TypeVar("OrphanT", bound=Orphan)


def reset_here(token: Token[Any]) -> bool:
    """Reset ``token`` if this is the Context that made it; never logs, never raises.

    True if it is (a token already used counts: someone restored this Context already).
    """
    try:
        token.var.reset(token)
    except ValueError:  # made in a different Context
        return False
    except RuntimeError:  # already used
        pass
    return True


def undo(orphans: Sequence[OrphanT], current: Callable[[], object]) -> list[OrphanT]:
    """In the calling Context, undo the ``orphans`` made here whose attached context is
    ``current()``, innermost first, as long as one is. Returns those undone, in order."""
    left = list(orphans)
    undone: list[OrphanT] = []
    now = current()
    while True:
        for orphan in left:
            if orphan.attached is now and orphan.reset():
                break
        else:
            return undone
        left.remove(orphan)
        undone.append(orphan)
        now = current()
