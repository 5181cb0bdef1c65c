"""What a type checker makes of the public API: run by ``tox -e typing`` (mypy --strict).

Not a test module: nothing here runs. Each call must check as written; a line marked
``# type: ignore[...]`` must be an error, since --strict reports an ignore that is unused.
"""

from __future__ import annotations

import concurrent.futures as cf

from typing_extensions import assert_type

import propagate


def double(x: int, *, label: str = "") -> int:
    return 2 * x


async def calls(pool: cf.ThreadPoolExecutor) -> None:
    assert_type(await propagate.to_thread(double, 1), int)
    assert_type(await propagate.to_thread(double, 1, executor=pool), int)
    assert_type(await propagate.to_thread(double, 1, label="a"), int)
    assert_type(await propagate.run_in_executor(pool, double, 1, label="a"), int)
    assert_type(await propagate.run_in_executor(None, double, 1), int)
    await propagate.to_thread(double, "one")  # type: ignore[arg-type]
    await propagate.to_thread(double, "one", executor=pool)  # type: ignore[arg-type]
    await propagate.to_thread(double, 1, labl="a")  # type: ignore[call-arg]
    await propagate.to_thread(double, 1, label=2)  # type: ignore[arg-type]
    await propagate.run_in_executor(pool, double, "one")  # type: ignore[arg-type]
    # keywords for fn and an executor together: refused, though it runs (see to_thread)
    await propagate.to_thread(double, 1, label="a", executor=pool)  # type: ignore[call-arg]


def submits(pool: propagate.ThreadPoolExecutor) -> None:
    assert_type(pool.submit(double, 1, label="a"), cf.Future[int])
    pool.submit(double, "one")  # type: ignore[arg-type]
    assert_type(propagate.wrap(double)(1), int)


def spans() -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    tracer = trace.get_tracer("a.library")
    assert_type(propagate.span("x", tracer=tracer)(double)(1), int)
    assert_type(propagate.trace(double, tracer=tracer, kind=SpanKind.CLIENT)(1), int)
    propagate.span("x")(double)("one")  # type: ignore[arg-type]
    traced = propagate.trace(name="y", attributes={"k": "v"})(double)
    assert_type(traced(1, label="a"), int)
    propagate.trace(double, kind="client")  # type: ignore[call-overload]
