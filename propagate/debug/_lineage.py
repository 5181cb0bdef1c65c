"""asyncio task lineage: which task created which, and the tree of the live ones."""

from __future__ import annotations

import asyncio
import itertools
import sys
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TextIO

from ._live import task_info


@dataclass(frozen=True)
class _Origin:
    order: int
    parent: weakref.ReferenceType[asyncio.Task[Any]] | None
    parent_name: str | None


_origins: weakref.WeakKeyDictionary[asyncio.Task[Any], _Origin] = weakref.WeakKeyDictionary()
_created = itertools.count()  # creation order

TaskFactory = Callable[..., "asyncio.Future[Any]"]


class _LineageFactory:
    """A task factory that records each task's creator, then defers to the previous factory."""

    def __init__(self, previous: TaskFactory | None) -> None:
        self.previous = previous

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                 **kwargs: Any) -> asyncio.Future[Any]:  # name= and context= on 3.11+
        if self.previous is None:
            task: asyncio.Future[Any] = asyncio.Task(coro, loop=loop, **kwargs)
        else:
            task = self.previous(loop, coro, **kwargs)
        if isinstance(task, asyncio.Task):
            parent = asyncio.current_task(loop)
            _origins[task] = _Origin(next(_created),
                                     None if parent is None else weakref.ref(parent),
                                     None if parent is None else parent.get_name())
        return task


def track_tasks(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Record, for every task created on ``loop`` from now on, the task that created it.

    ``loop`` defaults to the running loop. The loop's existing task factory, if any,
    still makes the tasks. Calling it again on the same loop does nothing.
    """
    loop = loop or asyncio.get_running_loop()
    previous = loop.get_task_factory()
    if not isinstance(previous, _LineageFactory):
        loop.set_task_factory(_LineageFactory(previous))  # type: ignore[arg-type]


def task_tree(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The live tasks of ``loop`` (default: the running loop), each indented under its creator.

    Only tasks created after `track_tasks` know their creator; a task whose creator has
    finished is shown at the top level with the creator's name.
    """
    tasks = asyncio.all_tasks(loop or asyncio.get_running_loop())
    children: dict[asyncio.Task[Any] | None, list[asyncio.Task[Any]]] = {}
    for task in tasks:
        origin = _origins.get(task)
        parent = None if origin is None or origin.parent is None else origin.parent()
        children.setdefault(parent if parent in tasks else None, []).append(task)
    lines: list[str] = []

    def draw(task: asyncio.Task[Any], depth: int) -> None:
        origin = _origins.get(task)
        note = ""
        if depth == 0 and origin is not None and origin.parent_name is not None:
            note = f" (created by {origin.parent_name}, finished)"
        lines.append("  " * depth + str(task_info(task)) + note)
        for child in sorted(children.get(task, []), key=_order):
            draw(child, depth + 1)

    for root in sorted(children.get(None, []), key=_order):
        draw(root, 0)
    return "\n".join(lines)


def print_task_tree(loop: asyncio.AbstractEventLoop | None = None,
                    file: TextIO | None = None) -> None:
    """Print `task_tree` to ``file`` (default: standard error)."""
    print(task_tree(loop), file=file or sys.stderr)


def _order(task: asyncio.Task[Any]) -> tuple[int, str]:
    origin = _origins.get(task)
    return (-1 if origin is None else origin.order, task.get_name())
