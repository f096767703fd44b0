"""``python -m chatbot serve | load | cluster``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence


def _serve(argv: Sequence[str]) -> int:
    import uvicorn

    from .app import create_app

    parser = argparse.ArgumentParser(prog="python -m chatbot serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    return 0


def _load(argv: Sequence[str]) -> int:
    from .load import run_load

    parser = argparse.ArgumentParser(prog="python -m chatbot load")
    parser.add_argument("--targets", required=True, help="comma-separated replica URLs")
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5)
    args = parser.parse_args(argv)
    targets = [t.strip().rstrip("/") for t in args.targets.split(",") if t.strip()]
    result = asyncio.run(run_load(targets, args.users, args.messages))
    print(
        f"answered {result.answered}/{result.sent} in {result.elapsed:.1f}s, "
        f"p50 {result.percentile(0.5):.2f}s p99 {result.percentile(0.99):.2f}s "
        f"(waiting for the limiter: p50 {result.wait_percentile(0.5):.2f}s "
        f"p99 {result.wait_percentile(0.99):.2f}s), errors {result.errors or 0}"
    )
    return 0 if not result.errors else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": _serve, "load": _load}
    if not argv or argv[0] not in (*commands, "cluster"):
        print("usage: python -m chatbot {serve,load,cluster} [options]", file=sys.stderr)
        return 2
    if argv[0] == "cluster":
        from .cluster import main as cluster_main

        return cluster_main(argv[1:])
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
