"""propagate/_heal.py: the one rule by which propagate.span and the runtime context undo an
attach whose detach happened in another Context."""

from __future__ import annotations

import contextvars
from typing import Any

import opentelemetry.context as otel_context
import pytest
from opentelemetry import trace

import propagate
from propagate import _heal, _runtime, _span

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("tests.heal", default="before")


def orphan(value: str) -> Any:
    """Set VAR to ``value`` here, as an attach does, and call its detach lost."""
    return _runtime._Orphan(VAR.set(value), value, None)  # type: ignore[arg-type]


def test_innermost_first_whatever_the_order_given() -> None:
    """I4: two nested attaches orphaned are undone innermost first, back to what was
    current before the outer one, whichever order the orphans are listed in."""
    def nested() -> tuple[list[str], str]:
        outer = orphan("outer")
        inner = orphan("inner")
        undone = _heal.undo([outer, inner], VAR.get)
        return [o.attached for o in undone], VAR.get()

    assert contextvars.Context().run(nested) == (["inner", "outer"], "before")


def test_an_attach_made_over_an_orphan_stays_until_it_is_detached() -> None:
    """I4: an orphan under a scope still open is left alone; once that scope exits, the
    orphan is undone."""
    def over() -> list[object]:
        lost = orphan("lost")
        still_open = VAR.set("open")
        seen: list[object] = [_heal.undo([lost], VAR.get), VAR.get()]
        VAR.reset(still_open)
        seen += [[o.attached for o in _heal.undo([lost], VAR.get)], VAR.get()]
        return seen

    assert contextvars.Context().run(over) == [[], "open", ["lost"], "before"]


def test_only_the_context_that_attached_is_undone() -> None:
    """I2: a copy of the entering Context, with the orphan's context current in it too,
    is left as it is; the entering Context itself is undone."""
    entering = contextvars.Context()
    lost = entering.run(orphan, "lost")
    copy = entering.copy()
    assert copy.run(_heal.undo, [lost], VAR.get) == []
    assert copy.run(VAR.get) == "lost"
    assert entering.run(_heal.undo, [lost], VAR.get) == [lost]
    assert entering.run(VAR.get) == "before"


def test_reset_here_never_raises() -> None:
    """I4: a token of another Context is refused (False), and a token used already counts
    as undone (someone restored that Context): neither raises, neither logs."""
    token = contextvars.Context().run(VAR.set, "elsewhere")
    assert _heal.reset_here(token) is False
    here = VAR.set("here")
    VAR.reset(here)
    assert _heal.reset_here(here) is True
    assert VAR.get() == "before"


@pytest.mark.parametrize("healer", ["propagate.span", "the runtime context"])
def test_both_healers_follow_it(healer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """I4: propagate.span and the runtime context heal through this one function: it is
    what undoes a scope exited in another Context."""
    undone: list[object] = []

    def counted(orphans: list[_heal.OrphanT], current: object) -> list[_heal.OrphanT]:
        done = _heal.undo(orphans, current)  # type: ignore[arg-type]
        undone.extend(done)
        return done

    tracer = trace.get_tracer("tests")
    if healer == "propagate.span":
        monkeypatch.setattr(_span, "undo", counted)
        ours = propagate.span("moved")
        ours.__enter__()
        with pytest.warns(propagate.CrossThreadExitWarning):
            contextvars.Context().run(ours.__exit__, None, None, None)
        _span.heal()
    else:
        monkeypatch.setattr(_runtime, "undo", counted)
        runtime = _runtime.RuntimeContext()
        monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", runtime)
        scope = tracer.start_as_current_span("moved")
        scope.__enter__()
        contextvars.Context().run(scope.__exit__, None, None, None)
        otel_context.get_current()
    assert len(undone) == 1
    assert trace.get_current_span() is trace.INVALID_SPAN
