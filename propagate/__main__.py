"""The command-line face: ``python -m propagate demo | doctor``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m propagate`` with ``argv`` (else the command line's); the exit code."""
    parser = argparse.ArgumentParser(prog="python -m propagate", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run one request and print its span tree",
        description="One request, through a thread pool, a process pool, asyncio and a DNS "
                    "lookup, printed as its span tree, with the worker processes' log lines; "
                    "a streaming response closed in another task shows the runtime context "
                    "(OTEL_PYTHON_CONTEXT=propagate). Beyond it, propagate carries the "
                    "context into Dask (propagate.dask), Ray (propagate.ray) and joblib "
                    "(propagate.joblib): see docs/distributed.md.")
    demo.add_argument("--stdlib", action="store_true",
                      help="use the stdlib's tools and OpenTelemetry's default runtime "
                           "context instead")
    demo.add_argument("--json", action="store_true", help="print the spans as JSON")
    commands.add_parser("doctor", help="print what a bug report needs")
    args = parser.parse_args(argv)
    if args.command == "demo":
        # Read when OpenTelemetry's context loads, which the demo's import does: the
        # stdlib's run is the baseline, on OpenTelemetry's default runtime context.
        os.environ["OTEL_PYTHON_CONTEXT"] = "contextvars_context" if args.stdlib else "propagate"
        from ._demo import main as demo_main

        return demo_main(stdlib=args.stdlib, as_json_output=args.json)
    from .debug._doctor import main as doctor_main

    return doctor_main()


if __name__ == "__main__":
    sys.exit(main())
