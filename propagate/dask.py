"""Dask: ``client.get_executor()`` that carries the caller's context to the workers.

Needs the ``dask`` extra (``distributed``) only for the client it is given: this module
never imports ``distributed`` itself.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import TYPE_CHECKING, Any

from ._executor import wrap_executor

if TYPE_CHECKING:
    from distributed import Client


def executor(client: Client, *, task_spans: bool = False, link: bool = False,
             relay: bool = True, relay_logs: bool = False, **kwargs: Any) -> cf.Executor:
    """Like ``client.get_executor(**kwargs)``, but every task runs in the submitter's context.

    The same as ``propagate.wrap_executor(client.get_executor(pure=False, **kwargs))``.
    What crosses to the worker: the current span's trace identity (spans the task starts
    are its children), the baggage, and the values of ContextVars registered with
    `propagate.register`. Unregistered ContextVars keep the worker's own values, and
    changes made on the worker never flow back. With opentelemetry-sdk's tracer
    provider installed here, the spans a worker records come back to it, exactly once,
    before the task's future resolves; the workers need no configuration.

    ``pure`` defaults to False: each ``submit`` is its own Dask task with its own key, as
    ``concurrent.futures`` promises, so no two submits share one result and its spans
    (and Dask is spared hashing the pickled task). Other keyword arguments (``workers``,
    ``resources``, ``retries``...) go to ``get_executor``. ``task_spans`` and ``link``
    work as for `propagate.ThreadPoolExecutor`; ``relay=False`` leaves the workers'
    own tracing alone (their spans stay there). ``relay_logs=True`` brings the ``logging``
    records a task emits on a worker home, as for `propagate.ProcessPoolExecutor`.
    """
    kwargs.setdefault("pure", False)
    get_executor: Any = client.get_executor  # unannotated in distributed, so untyped to mypy
    return wrap_executor(get_executor(**kwargs), task_spans=task_spans, link=link, relay=relay,
                         relay_logs=relay_logs)
