"""``limiter``: the operator's command line (stats, runtime limits, tenants, reset, doctor).

Every command takes ``--url`` (default ``$REDIS_URL``, else ``redis://127.0.0.1:6379/0``;
``redis+cluster://`` and ``redis+sentinel://`` too) and ``--namespace`` (default
``limiter``). The APIs and their configured limits come from the registry that every
limiter writes when it first reaches Redis, so no application code is needed here.

Exit status: 0 done, 1 failed (Redis unreachable, an unknown API, a doctor check that
failed), 2 a usage error.

This module parses the arguments and reports the outcome; the commands themselves are in
:mod:`limiter._cli_commands`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from ._checks import check_namespace
from ._cli_commands import COMMANDS, Failed, Session, scrub
from ._config import (
    MAX_COUNT,
    MAX_SECONDS,
    MAX_TENANT_BYTES,
    Rate,
    check_tenant,
    check_weight,
)
from ._connect import redact_url
from ._errors import ConfigError, LimiterError, LimiterUnavailable

__all__ = ["main"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at most {MAX_COUNT} (2**53 - 1)")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds > 0")
    return value


def _ttl(text: str) -> float:
    """``--ttl``: seconds from 0.001 to 366 days (what the library accepts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.001 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a number of seconds from 0.001 to {MAX_SECONDS:.0f} (366 days)"
        )
    return value


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    try:
        return check_weight(value)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be a number from 1e-9 to 1e9 (1 is the default weight)"
        ) from None


def _tenant(text: str) -> str:
    """A tenant's name; ``''`` is the default tenant (requests that name none)."""
    if text == "":
        return text
    try:
        return check_tenant(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be at most {MAX_TENANT_BYTES} bytes of UTF-8 text "
            "('' is requests that name no tenant)"
        ) from None


def _rate(text: str) -> Rate:
    limit, sep, period = text.partition("/")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: write LIMIT/SECONDS, e.g. 5/1 or 100/10")
    try:
        count = _count(limit)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: LIMIT {exc}") from None
    try:
        return Rate(count, float(period))
    except (ValueError, ConfigError):  # not a number, NaN, inf, out of range
        raise argparse.ArgumentTypeError(
            f"{text!r}: SECONDS must be a number from 0.001 to {MAX_SECONDS:.0f} (366 days)"
        ) from None


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help=f"Redis URL (default: $REDIS_URL, else {DEFAULT_URL})",
    )
    common.add_argument(
        "--namespace", default=argparse.SUPPRESS, help="key namespace (default: limiter)"
    )
    parser = argparse.ArgumentParser(
        prog="limiter",
        description="Inspect and steer the Redis-backed limiter of every replica at once.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stats = sub.add_parser(
        "stats", parents=[common], help="cluster-wide table per API (in flight, windows, totals)"
    )
    stats.add_argument("apis", nargs="*", metavar="API", help="only these APIs")
    stats.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_seconds,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until interrupted",
    )
    stats.add_argument("--count", type=_count, help="with --watch: stop after COUNT tables")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    limits = sub.add_parser("limits", parents=[common], help="show or change runtime limits")
    lsub = limits.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = lsub.add_parser("show", parents=[common], help="configured, override, in force")
    show.add_argument("apis", nargs="*", metavar="API")
    show.add_argument("--json", action="store_true")
    set_ = lsub.add_parser(
        "set", parents=[common], help="override limits of one API for every replica"
    )
    set_.add_argument("api", metavar="API")
    set_.add_argument("--max-concurrent", type=_count, metavar="N")
    set_.add_argument("--per-minute", type=_count, metavar="N")
    set_.add_argument("--per-hour", type=_count, metavar="N")
    set_.add_argument(
        "--rate",
        type=_rate,
        action="append",
        default=[],
        metavar="N/SECONDS",
        help="a configured window of SECONDS, e.g. 5/1 (repeatable)",
    )
    set_.add_argument("--tokens-per-minute", type=_count, metavar="N")
    set_.add_argument(
        "--ttl", type=_ttl, metavar="SECONDS", help="the override ends by itself after this"
    )
    clear = lsub.add_parser("clear", parents=[common], help="back to the configured limits")
    clear.add_argument("api", metavar="API")

    tenants = sub.add_parser(
        "tenants", parents=[common], help="the fair queue: tenants, priorities, weights"
    )
    tsub = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    tshow = tsub.add_parser(
        "show", parents=[common], help="waiting by priority, tenants and their weights"
    )
    tshow.add_argument("apis", nargs="*", metavar="API")
    tshow.add_argument("--json", action="store_true")
    tset = tsub.add_parser("set", parents=[common], help="give a tenant a weight for every replica")
    tset.add_argument("api", metavar="API")
    tset.add_argument(
        "tenant", type=_tenant, metavar="TENANT", help="'' for requests that name no tenant"
    )
    tset.add_argument(
        "weight", type=_weight, metavar="WEIGHT", help="its share of the queue (default 1)"
    )
    tset.add_argument(
        "--ttl", type=_ttl, metavar="SECONDS", help="the weight ends by itself after this"
    )
    tclear = tsub.add_parser(
        "clear", parents=[common], help="back to the tenant's configured weight"
    )
    tclear.add_argument("api", metavar="API")
    tclear.add_argument(
        "tenant", type=_tenant, metavar="TENANT", help="'' for requests that name no tenant"
    )

    reset = sub.add_parser(
        "reset", parents=[common], help="forget an API's state (leases, queue, windows, totals)"
    )
    reset.add_argument("api", metavar="API")

    sub.add_parser(
        "doctor", parents=[common], help="connectivity, Redis version, scripts, registry"
    )
    return parser


# -- commands ----------------------------------------------------------------------------


async def run(argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one command (``argv`` without the program name); returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _parser()
    args = parser.parse_args(list(argv))
    url = getattr(args, "url", None) or os.environ.get("REDIS_URL") or DEFAULT_URL
    namespace = getattr(args, "namespace", "limiter")
    command = COMMANDS[(args.command, getattr(args, "action", None))]
    if args.command == "stats" and args.count is not None and args.watch is None:
        parser.error("stats: --count N needs --watch (one table is shown without it)")
    if args.command == "limits" and args.action == "set":
        given = (args.max_concurrent, args.per_minute, args.per_hour, args.tokens_per_minute)
        if all(v is None for v in given) and not args.rate:
            parser.error(
                "limits set: give at least one of --max-concurrent, --per-minute, "
                "--per-hour, --rate, --tokens-per-minute"
            )
    try:
        check_namespace(namespace)
    except ConfigError as exc:  # "namespace='a b': must be ...": say it as the flag
        why = str(exc).partition(": ")[2]
        print(f"limiter: invalid --namespace {namespace!r}: {why}", file=err)
        return 2
    try:
        session = Session(url, namespace, out, err)
    except (ConfigError, ValueError) as exc:  # ValueError: redis-py refused the URL
        shown = redact_url(url)
        # "url: <problem> (in <url>)": the line names the URL once, as --url.
        why = str(exc).removeprefix("url: ").removesuffix(f" (in {shown})")
        print(f"limiter: invalid --url {shown}: {scrub(why, url)}", file=err)
        return 2
    try:
        return await command(session, args)
    except Failed as exc:
        print(f"limiter: {exc}", file=err)
        return 1
    except LimiterUnavailable as exc:
        print(f"limiter: Redis at {session.shown_url} is unavailable: {exc}", file=err)
        return 1
    except LimiterError as exc:
        print(f"limiter: {exc}", file=err)
        return 1
    finally:
        await session.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    """The ``limiter`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="limiter: %(message)s")
    try:
        code = asyncio.run(run(args))
    except KeyboardInterrupt:  # how --watch ends; anything else interrupted: 130
        code = 0 if "--watch" in args else 130
    sys.exit(code)
