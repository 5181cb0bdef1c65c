"""Switch points: where a context changes hands, and where `debug.jitter` widens races.

``hook`` is None unless a jitter is active, so each point costs one global read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

hook: Callable[[str], None] | None = None


def point(name: str) -> None:
    """Call at a switch point: ``capture``, ``attach``, ``detach``, ``task-start``, ``task-end``."""
    current = hook  # read once: a jitter may end between two reads
    if current is not None:
        current(name)


def around(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` between the ``task-start`` and ``task-end`` points."""
    point("task-start")
    try:
        return fn(*args, **kwargs)
    finally:
        point("task-end")
