"""Item 12: what deployments and per-model limits add to the uncontended pair.

The API of item 3 (``max_concurrent=1000`` + 1 min + 1 h windows that never refuse) is
timed side by side, in one interleaved loop (``_util.interleaved``), with the same API
given limit sets:

- ``2x2`` (the item): 2 deployments, each with ``max_concurrent``, a per-minute request
  window and a token budget, and 2 models, each with a request window and a token
  budget. Each pair is ``acquire("api-sets", tokens=1500, model=m)`` + ``release()``, m
  alternating between the two models. The acquire script checks the API's limits, the
  model's and both deployments' (choosing the one with more headroom) and admits into
  the API, the model and the chosen deployment; the release frees all three.
- diagnostics that split the cost: the 2 models alone, the 2 deployments alone (no model
  named), and a grid: the 2x2 API whose deployments also limit each model
  (``d:<key>:m:<model>`` sets, 4 more, 1 of each deployment checked per request).
- two no-op ``EVALSHA`` calls, the floor of any two-script pair.

All limits are far above what the run can use: nothing is refused, nothing waits, and no
token use is reported (the release has no tokens to reconcile).

A verification pass before the timing counts, per pair: round trips (client writes),
commands sent, script calls and their time inside Redis (``INFO commandstats``
cmdstat_fcall + cmdstat_evalsha, as item 3), the commands Redis ran (scripts' commands
included) and those commands by name, so that the Redis time splits into the commands the
scripts run and the scripts' own Lua. It is interleaved too: ``BATCH`` pairs of each
operation in turn, ``INFO commandstats`` around each batch. Checks: exactly 2 round trips
/ 2 commands sent / 2 script calls per 2x2 pair, both deployments and both models used,
and the issue's target: the 2x2 pair at most 1.5x the plain pair on the client (p50).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis

from limiter import APILimits, Limiter

from ._util import (
    CLIENT_TIMEOUTS,
    Check,
    CountingConnection,
    Counts,
    Report,
    Row,
    interleaved,
    summarize,
)
from .single import API, LIMITS

__all__ = ["CONFIGS", "run_deployments"]

Op = Callable[[], Awaitable[Any]]

#: Limits no run comes near: requests and tokens.
BIG = 10**9
BIG_TOKENS = 10**12
#: Tokens each admission of an API with token budgets reserves.
TOKENS = 1500
MODELS = ("gpt-4o", "gpt-4o-mini")
DEPLOYMENTS = ("key-a", "key-b")


def _model() -> APILimits:
    return APILimits(requests_per_minute=BIG, tokens_per_minute=BIG_TOKENS)


def _deployment(*, with_models: bool = False) -> APILimits:
    return APILimits(
        max_concurrent=1000,
        requests_per_minute=BIG,
        tokens_per_minute=BIG_TOKENS,
        models={m: _model() for m in MODELS} if with_models else {},
    )


def _api(*, deployments: bool, models: bool, grid: bool = False) -> APILimits:
    """Item 3's limits on the API itself, plus the limit sets asked for."""
    return APILimits(
        max_concurrent=LIMITS.max_concurrent,
        requests_per_minute=LIMITS.requests_per_minute,
        requests_per_hour=LIMITS.requests_per_hour,
        deployments=(
            {d: _deployment(with_models=grid) for d in DEPLOYMENTS} if deployments else {}
        ),
        models={m: _model() for m in MODELS} if models else {},
    )


#: Per operation: the API's limits, whether it reserves tokens, whether it names a model.
CONFIGS: dict[str, tuple[APILimits, bool, bool]] = {
    "plain": (LIMITS, False, False),
    "sets": (_api(deployments=True, models=True), True, True),
    "models": (_api(deployments=False, models=True), True, True),
    "deployments": (_api(deployments=True, models=False), True, False),
    "grid": (_api(deployments=True, models=True, grid=True), True, True),
}

LABELS = {
    "noop": ("12n", "two no-op EVALSHA (`return 1`), in this loop"),
    "plain": (
        "12p",
        "limiter pair, the API's own limits only (= item 3: concurrency + 1 min + 1 h)",
    ),
    "sets": (
        "12",
        "the same API with 2 deployments x 2 models: `acquire(tokens=1500, model=m)` + "
        "`release`, m alternating between the 2 (each deployment: concurrency + 1 min + "
        "tokens; each model: 1 min + tokens)",
    ),
    "models": ("12m", "diagnostic: the 2 models only (no deployments)"),
    "deployments": ("12k", "diagnostic: the 2 deployments only (no model named)"),
    "grid": (
        "12g",
        "diagnostic: 2x2 whose deployments also limit each model (4 more sets: 1 min + tokens)",
    ),
}


class _Subject:
    """One limiter per configuration and a no-op script, all on one client."""

    def __init__(self, url: str, namespace: str, *, counting: bool) -> None:
        extra: dict[str, Any] = {"connection_class": CountingConnection} if counting else {}
        self.client = aioredis.from_url(url, **extra, **CLIENT_TIMEOUTS)
        self.lims = {
            name: Limiter(self.client, {self.api(name): limits}, namespace=f"{namespace}-{name}")
            for name, (limits, _, _) in CONFIGS.items()
        }
        self.noop = self.client.register_script("return 1")
        #: Slots per (deployment, model) of the pairs run so far, per operation; kept in
        #: the verification pass only (not while timing).
        self.spread: dict[str, Counter[tuple[str | None, str | None]]] | None = (
            {name: Counter() for name in CONFIGS} if counting else None
        )

    @staticmethod
    def api(name: str) -> str:
        return API if name == "plain" else f"{API}-{name}"

    async def ready(self) -> bool:
        """Load the scripts; True when the limiters run as Redis Functions (7.0+)."""
        modes = set()
        for lim in self.lims.values():
            await lim._runner.ready()
            modes.add(lim._runner.functions)
        return modes == {True}

    def ops(self) -> dict[str, Op]:
        async def noop_pair() -> None:
            await self.noop()
            await self.noop()

        def pair(name: str) -> Op:
            _, tokens, model = CONFIGS[name]
            lim, api = self.lims[name], self.api(name)
            spread = None if self.spread is None else self.spread[name]
            if not tokens:

                async def plain() -> None:
                    slot = await lim.acquire(api)
                    await slot.release()

                return plain
            turn = [0]

            async def with_sets() -> None:
                turn[0] += 1
                m = MODELS[turn[0] % 2] if model else None
                slot = await lim.acquire(api, tokens=TOKENS, model=m)
                if spread is not None:
                    spread[slot.deployment, slot.model] += 1
                await slot.release()

            return with_sets

        ops: dict[str, Op] = {"noop": noop_pair}
        ops.update((name, pair(name)) for name in CONFIGS)
        return ops

    async def aclose(self) -> None:
        for lim in self.lims.values():
            with contextlib.suppress(Exception):
                await lim.aclose()
        await self.client.aclose()


async def _commandstats(probe: aioredis.Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds of every command Redis ran so far, by lower-case name."""
    stats = await probe.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v.get("calls", 0)), int(v.get("usec", 0)))
        for name, v in stats.items()
    }


#: Calls and µs per pair of each command the scripts ran, by lower-case name.
ByCommand = dict[str, tuple[float, float]]


#: Pairs of one operation between two ``INFO commandstats`` of the verification pass.
BATCH = 50
#: Script commands: their calls are the pair's script calls, their usec its Redis time.
_SCRIPTS = ("evalsha", "fcall")


async def _verify(
    url: str, probe: aioredis.Redis, n_verify: int
) -> tuple[dict[str, Counts], dict[str, ByCommand], dict[str, Counter[Any]], bool, int]:
    """Per operation: counts per pair, the commands its scripts ran by name, and the
    (deployment, model) of its slots; whether the limiters ran as Functions; the pairs
    counted per operation.

    Like ``_util.command_counts``, but interleaved: ``BATCH`` pairs of each operation in
    turn, rotating which goes first, with ``INFO commandstats`` before and after each
    batch, so that a slow moment of Redis falls on every operation alike (the Redis time
    of one operation counted over one stretch of the run swings by 1.5x or more on this
    VM). Commands Redis ran = the calls of every command but the probe's ``INFO``, the
    commands scripts run included (what ``total_commands_processed`` counts).
    """
    s = _Subject(url, "bench-dep-verify", counting=True)
    ops = s.ops()
    names = list(ops)
    calls: dict[str, Counter[str]] = {name: Counter() for name in names}
    usec: dict[str, Counter[str]] = {name: Counter() for name in names}
    writes = dict.fromkeys(names, 0)
    sent = dict.fromkeys(names, 0)
    batch = min(BATCH, n_verify)
    rounds = max(1, n_verify // batch)
    try:
        functions = await s.ready()
        for op in ops.values():
            for _ in range(20):  # warm: scripts loaded, connections open, keys made
                await op()
        for spread in (s.spread or {}).values():
            spread.clear()
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                op = ops[name]
                before = await _commandstats(probe)
                w0, c0 = CountingConnection.writes, CountingConnection.commands
                for _ in range(batch):
                    await op()
                writes[name] += CountingConnection.writes - w0
                sent[name] += CountingConnection.commands - c0
                after = await _commandstats(probe)
                for cmd, (n_calls, n_usec) in after.items():
                    calls0, usec0 = before.get(cmd, (0, 0))
                    if cmd != "info" and n_calls > calls0:
                        calls[name][cmd] += n_calls - calls0
                        usec[name][cmd] += n_usec - usec0
        spread_seen = {name: Counter(c) for name, c in (s.spread or {}).items()}
    finally:
        await s.aclose()
    pairs = rounds * batch
    counts: dict[str, Counts] = {}
    by_command: dict[str, ByCommand] = {}
    for name in names:
        counts[name] = Counts(
            round_trips=writes[name] / pairs,
            sent=sent[name] / pairs,
            executed=sum(calls[name].values()) / pairs,
            evalsha=sum(calls[name][c] for c in _SCRIPTS) / pairs,
            lua_us=sum(usec[name][c] for c in _SCRIPTS) / pairs,
        )
        by_command[name] = {
            cmd: (k / pairs, usec[name][cmd] / pairs)
            for cmd, k in calls[name].items()
            if cmd not in _SCRIPTS
        }
    return counts, by_command, spread_seen, functions, pairs


async def _timed(url: str, n: int) -> tuple[dict[str, list[int]], dict[str, float]]:
    s = _Subject(url, "bench-dep", counting=False)
    try:
        await s.ready()
        return await interleaved(s.ops(), n)
    finally:
        await s.aclose()


async def run_deployments(url: str, n: int, n_verify: int, report: Report) -> None:
    """Item 12, appended to ``report``."""
    probe = aioredis.from_url(url, **CLIENT_TIMEOUTS)
    try:
        counts, by_command, spread, functions, pairs = await _verify(url, probe, n_verify)
        await probe.flushall()
        samples, cpu_us = await _timed(url, n)
        await probe.flushall()
    finally:
        await probe.aclose()
    _report(samples, cpu_us, counts, by_command, spread, functions, pairs, report)


def _commands_us(got: ByCommand) -> float:
    return sum(usec for _, usec in got.values())


def _breakdown(got: ByCommand) -> str:
    return ", ".join(
        f"{cmd.upper()} {calls:.3g}" for cmd, (calls, _) in sorted(got.items()) if calls >= 0.005
    )


def _difference(more: ByCommand, less: ByCommand) -> str:
    out = []
    for cmd in sorted(set(more) | set(less)):
        calls = more.get(cmd, (0.0, 0.0))[0] - less.get(cmd, (0.0, 0.0))[0]
        usec = more.get(cmd, (0.0, 0.0))[1] - less.get(cmd, (0.0, 0.0))[1]
        if abs(calls) >= 0.005:
            out.append(f"{cmd.upper()} {calls:+.3g} ({usec:+.1f} µs)")
    return ", ".join(out)


def _report(
    samples: dict[str, list[int]],
    cpu_us: dict[str, float],
    counts: dict[str, Counts],
    by_command: dict[str, ByCommand],
    spread: dict[str, Counter[Any]],
    functions: bool,
    pairs: int,
    report: Report,
) -> None:
    sums = {name: summarize(v) for name, v in samples.items()}
    plain = sums["plain"]
    mode = "Functions (FCALL)" if functions else "EVALSHA scripts"
    for name, (item, label) in LABELS.items():
        c = counts[name]
        note = ""
        if c.lua_us > 0:
            note = f"Redis time {c.lua_us:.1f} µs/op"
            if name != "noop":
                lua = c.lua_us - _commands_us(by_command[name])
                note += f" (commands {_commands_us(by_command[name]):.0f}, Lua {lua:.0f})"
        if name not in ("noop", "plain"):
            note += f"; p50 {sums[name].p50_us / plain.p50_us:.2f}x 12p"
        report.rows.append(
            Row(
                item=item,
                label=label,
                summary=sums[name],
                counts=c,
                cpu_us=cpu_us[name],
                note=note,
            )
        )

    c, cp = counts["sets"], counts["plain"]
    report.checks.append(
        Check(
            "12. 2x2 pair: round trips / commands sent / script calls run by Redis, per pair",
            f"{c.round_trips:g} / {c.sent:g} / {c.evalsha:g} (over {pairs} pairs: client "
            "writes and packed commands; `INFO commandstats` cmdstat_fcall + cmdstat_evalsha "
            "delta)",
            "exactly 2 / 2 / 2",
            c.round_trips == 2 and c.sent == 2 and c.evalsha == 2,
        )
    )
    seen = spread["sets"]
    deps = {d for d, _ in seen}
    models = {m for _, m in seen}
    shown = ", ".join(f"{d}/{m}: {k}" for (d, m), k in sorted(seen.items(), key=str))
    report.checks.append(
        Check(
            "12. 2x2 pair: slots per deployment / model over the verification pass",
            shown or "none",
            "both deployments and both models used",
            deps == set(DEPLOYMENTS) and models == set(MODELS),
        )
    )
    s = sums["sets"]
    ratio50 = s.p50_us / plain.p50_us
    report.checks.append(
        Check(
            "12/12p. 2x2 pair / plain pair, client",
            f"p50 {ratio50:.2f}x ({s.p50_us:.0f} vs {plain.p50_us:.0f} µs), "
            f"p99 {s.p99_us / plain.p99_us:.2f}x ({s.p99_us:.0f} vs {plain.p99_us:.0f} µs), "
            f"mean {s.mean_us / plain.mean_us:.2f}x; client CPU {cpu_us['sets']:.0f} vs "
            f"{cpu_us['plain']:.0f} µs",
            "at most 1.5x (p50)",
            ratio50 <= 1.5,
        )
    )
    report.checks.append(
        Check(
            "12/12p. 2x2 pair / plain pair, in Redis",
            f"Redis time {c.lua_us:.1f} vs {cp.lua_us:.1f} µs ({c.lua_us / cp.lua_us:.2f}x); "
            f"commands run {c.executed:g} vs {cp.executed:g} "
            f"({c.executed / cp.executed:.2f}x); scripts run as {mode}",
            "(reported)",
            None,
        )
    )

    parts = []
    for name in ("models", "deployments", "sets", "grid"):
        got = counts[name]
        parts.append(
            f"{LABELS[name][0]} {got.lua_us - cp.lua_us:+.0f} µs / "
            f"{got.executed - cp.executed:+.3g} commands"
        )
    sets_cmds, plain_cmds = by_command["sets"], by_command["plain"]
    report.notes.append(
        f"Item 12 (limit sets, scripts run as {mode}): Redis time per pair = the commands the "
        f"scripts run (their `INFO commandstats` usec) + Lua (the rest: the scripts' own code "
        f"and the conversion of each `redis.call`'s arguments and reply). Plain pair "
        f"(12p): {cp.lua_us:.0f} µs = {_commands_us(plain_cmds):.0f} commands + "
        f"{cp.lua_us - _commands_us(plain_cmds):.0f} Lua; 2x2 (12): {c.lua_us:.0f} µs = "
        f"{_commands_us(sets_cmds):.0f} commands + {c.lua_us - _commands_us(sets_cmds):.0f} "
        f"Lua. Over the plain pair: {'; '.join(parts)}. Commands the scripts run per pair: "
        f"12p: {_breakdown(plain_cmds)}; 12: {_breakdown(sets_cmds)}; 12 - 12p: "
        f"{_difference(sets_cmds, plain_cmds)}. The 2x2 pair p50 is {ratio50:.2f}x the plain "
        f"pair's: the target (at most 1.5x) is {'met' if ratio50 <= 1.5 else 'not met'}."
    )
