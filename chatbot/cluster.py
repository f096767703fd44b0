"""``python -m chatbot cluster``: Redis, both fake providers and N replicas, a bounded load,
live progress, and a report judged by the fake providers' own records.

Everything runs as separate processes on 127.0.0.1 and free ports, started and stopped here.
The demo scales the providers' windows down (a 5 s "minute") so that a run of a minute
or two crosses many windows; the limiter gets exactly the same limits as the fakes.

``--noisy-user`` runs the scenario twice, each on a cluster of its own: as is, then with a
noisy user and a batch job (``POST /batch``, priority 0) pressing on the same limits, and
compares the ordinary users' waits in the limiter (:func:`run_noisy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from limiter.testing import RedisServer, free_port

from .load import BATCH_JOB, NOISY_USER, LoadResult, run_load

__all__ = ["ClusterConfig", "ClusterReport", "NoisyReport", "run_cluster", "run_noisy"]

OPENAI_KEY = "sk-fake-openai-key"
ZAPIER_TOKEN = "fake-zapier-token"


@dataclass(frozen=True)
class ClusterConfig:
    """The demo's limits: the same numbers for the fakes (referees) and the limiter."""

    replicas: int = 3
    users: int = 30
    messages: int = 8
    tool_every: int = 4
    openai_concurrent: int = 8
    openai_per_window: int = 80
    openai_window: float = 10.0
    openai_latency: float = 0.25
    zapier_concurrent: int = 3
    zapier_per_minute: int = 30
    zapier_minute: float = 5.0
    zapier_per_hour: int = 75
    zapier_hour: float = 60.0
    zapier_latency: float = 0.3
    #: Seconds added to every window (DESIGN: admission-to-arrival jitter; a replica's
    #: event loop can stall ~0.1 s in a garbage collection after admission).
    window_margin: float = 0.15
    lease_ttl: float = 5.0
    ticket_ttl: float = 2.0
    #: A noisy user meaning to send this many times the others' messages (0: none),
    #: ``noisy_in_flight`` at once, while the others send theirs.
    noisy: int = 0
    noisy_in_flight: int = 4
    #: Items a batch job keeps in flight at POST /batch (priority 0) meanwhile (0: none).
    batch_workers: int = 0

    def limits_json(self) -> str:
        return json.dumps(
            {
                "openai": {
                    "max_concurrent": self.openai_concurrent,
                    "rates": [[self.openai_per_window, self.openai_window]],
                    "window_margin": self.window_margin,
                    "backoff_min": 0.2,
                    "backoff_max": 2.0,
                    "lease_ttl": self.lease_ttl,
                },
                "zapier": {
                    "max_concurrent": self.zapier_concurrent,
                    "rates": [
                        [self.zapier_per_minute, self.zapier_minute],
                        [self.zapier_per_hour, self.zapier_hour],
                    ],
                    "window_margin": self.window_margin,
                    "backoff_min": 0.2,
                    "backoff_max": 2.0,
                    "lease_ttl": self.lease_ttl,
                },
            }
        )


@dataclass
class ClusterReport:
    """What the users saw and what the providers recorded."""

    config: ClusterConfig
    load: LoadResult
    openai: dict[str, Any]
    zapier: dict[str, Any]
    killed: str | None = None
    #: Last time (time.monotonic) OpenAI's window held a request back.
    saturated_until: float | None = None

    @property
    def excess(self) -> dict[str, int]:
        """How far each provider's record went past each limit (0 everywhere is the goal)."""
        c, o, z = self.config, self.openai, self.zapier
        return {
            "openai in flight": max(0, o["max_in_flight"] - c.openai_concurrent),
            "openai per window": max(0, o["max_requests_in_window"] - c.openai_per_window),
            "openai 429s": o["rejected_total"],
            "zapier in flight": max(0, z["max_concurrent"] - c.zapier_concurrent),
            "zapier per minute": max(0, z["max_starts_in_minute_window"] - c.zapier_per_minute),
            "zapier per hour": max(0, z["max_starts_in_hour_window"] - c.zapier_per_hour),
            "zapier 429s": z["rejected_429"],
        }

    @property
    def openai_utilisation(self) -> float:
        """Admitted OpenAI requests / the most its window allows, while requests waited.

        Counted from the fake's own arrival times over the whole periods from the first
        arrival to the last moment the window held a request back (after that, demand, not
        the limit, set the pace): the window allows ``limit`` per ``period`` (the window
        margin's cost is part of what this measures).
        """
        arrivals = sorted(self.openai.get("arrivals", []))
        if len(arrivals) < 2 or self.saturated_until is None:
            return 0.0
        period = self.config.openai_window
        windows = math.floor((self.saturated_until - arrivals[0]) / period)
        if windows < 1:
            return 0.0
        end = arrivals[0] + windows * period
        counted = [t for t in arrivals if t < end]
        return len(counted) / (self.config.openai_per_window * windows)


class _Proc:
    """A child process logging to a file (a pipe nobody reads would fill and block it)."""

    def __init__(
        self, name: str, logdir: str, argv: list[str], env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def output(self) -> str:
        with open(self.log_path) as fh:
            return fh.read()

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start:\n{self.output()[-2000:]}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=8)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()


class Cluster:
    """Redis, the fakes and N replicas, as processes; a context manager that stops them all."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.procs: list[_Proc] = []
        self.replicas: list[tuple[_Proc, str]] = []
        self.redis: RedisServer | None = None
        self.openai_url = ""
        self.zapier_url = ""
        self.logdir = tempfile.mkdtemp(prefix="fleetlimit-cluster-")

    def __enter__(self) -> Cluster:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self) -> None:
        c = self.config
        py = sys.executable
        self.redis = RedisServer().start()
        fake_openai = _Proc(
            "fake-openai",
            self.logdir,
            [
                py, "-m", "chatbot.fakes.openai_server", "--port", "0",
                "--max-in-flight", str(c.openai_concurrent),
                "--rpm", str(c.openai_per_window),
                "--window-seconds", str(c.openai_window),
                "--latency", str(c.openai_latency),
                "--api-key", OPENAI_KEY,
            ],
        )  # fmt: skip
        self.procs.append(fake_openai)
        port = fake_openai.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1)
        self.openai_url = f"http://127.0.0.1:{port}"
        fake_zapier = _Proc(
            "fake-zapier",
            self.logdir,
            [
                py, "-m", "chatbot.fakes.zapier_server", "--port", "0",
                "--max-concurrent", str(c.zapier_concurrent),
                "--per-minute", str(c.zapier_per_minute),
                "--minute-seconds", str(c.zapier_minute),
                "--per-hour", str(c.zapier_per_hour),
                "--hour-seconds", str(c.zapier_hour),
                "--latency", str(c.zapier_latency),
                "--token", ZAPIER_TOKEN,
            ],
        )  # fmt: skip
        self.procs.append(fake_zapier)
        port = fake_zapier.wait_for_line(r"listening on http://127\.0\.0\.1:(\d+)").group(1)
        self.zapier_url = f"http://127.0.0.1:{port}"
        for i in range(c.replicas):
            self.add_replica(f"replica-{i + 1}")
        for proc, url in self.replicas:
            _wait_healthy(proc, url)

    def add_replica(self, name: str) -> str:
        assert self.redis is not None
        port = free_port()
        env = {
            "REDIS_URL": self.redis.url,
            "OPENAI_BASE_URL": f"{self.openai_url}/v1",
            "OPENAI_API_KEY": OPENAI_KEY,
            "ZAPIER_MCP_URL": f"{self.zapier_url}/mcp",
            "ZAPIER_MCP_TOKEN": ZAPIER_TOKEN,
            "LIMITS_JSON": self.config.limits_json(),
            "TICKET_TTL": str(self.config.ticket_ttl),
            "REPLICA_NAME": name,
        }
        argv = [sys.executable, "-m", "chatbot", "serve", "--port", str(port)]
        proc = _Proc(name, self.logdir, argv, env)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        self.replicas.append((proc, url))
        return url

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.replicas]

    def records(self) -> tuple[dict[str, Any], dict[str, Any]]:
        with httpx2.Client(timeout=10) as client:
            o = client.get(f"{self.openai_url}/admin/record").json()
            z = client.get(f"{self.zapier_url}/admin/record").json()
        return o, z

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.logdir, ignore_errors=True)


def _wait_healthy(proc: _Proc, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    with httpx2.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited: {proc.output()[-2000:]}")
            try:
                response = client.get(f"{url}/health")
                if response.status_code == 200:
                    return
                last = response.text
            except httpx2.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not healthy after {timeout}s: {last}")


@contextlib.contextmanager
def _progress(console: Console, total: int) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("[bold]messages"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield progress


async def _drive(
    cluster: Cluster, console: Console, kill_one: bool
) -> tuple[LoadResult, str | None, float | None]:
    c = cluster.config
    total = c.users * c.messages
    killed: str | None = None
    saturated: list[float | None] = [None]
    held_back = [0]
    window_reason = f"rate:{c.openai_window:g}s"
    with _progress(console, total) as progress:
        task = progress.add_task("load", total=total, status="")

        def on_progress(result: LoadResult) -> None:
            done = result.answered + sum(result.errors.values())
            progress.update(task, completed=done)

        async def poll() -> None:
            async with httpx2.AsyncClient(timeout=5) as client:
                while True:
                    await asyncio.sleep(0.25)
                    with contextlib.suppress(httpx2.HTTPError, ValueError):
                        url = cluster.urls[-1]
                        apis = (await client.get(f"{url}/stats")).json()["apis"]
                        o, z = apis["openai"], apis["zapier"]
                        held = o["refusals"].get(window_reason, 0)
                        if held > held_back[0]:  # the window held someone back since last poll
                            held_back[0] = held
                            saturated[0] = time.monotonic()
                        status = (
                            f"openai {o['concurrent_requests']}/{c.openai_concurrent} "
                            f"(waiting {o['waiting']})  zapier "
                            f"{z['concurrent_requests']}/{c.zapier_concurrent} "
                            f"(waiting {z['waiting']})"
                        )
                        progress.update(task, status=status)

        async def killer() -> None:
            nonlocal killed
            await asyncio.sleep(5.0)
            proc, _ = cluster.replicas[0]
            proc.kill()
            killed = proc.name
            console.print(f"[yellow]SIGKILLed {proc.name} mid-run; the others carry on")

        poller = asyncio.create_task(poll())
        chaos = asyncio.create_task(killer()) if kill_one else None
        try:
            result = await run_load(
                cluster.urls,
                c.users,
                c.messages,
                tool_every=c.tool_every,
                progress=on_progress,
                noisy=c.noisy,
                noisy_in_flight=c.noisy_in_flight,
                batch_workers=c.batch_workers,
            )
        finally:
            poller.cancel()
            if chaos is not None:
                chaos.cancel()
    return result, killed, saturated[0]


def run_cluster(
    config: ClusterConfig, *, console: Console | None = None, kill_one: bool = False
) -> ClusterReport:
    """Start everything, drive the load, stop everything, and return the report."""
    console = console or Console()
    with Cluster(config) as cluster:
        console.print(
            f"[bold]cluster up:[/] redis {cluster.redis.url if cluster.redis else '?'}, "
            f"fake OpenAI {cluster.openai_url}, fake Zapier {cluster.zapier_url}, "
            f"{config.replicas} replicas"
        )
        load, killed, saturated_until = asyncio.run(_drive(cluster, console, kill_one))
        openai_record, zapier_record = cluster.records()
    return ClusterReport(config, load, openai_record, zapier_record, killed, saturated_until)


@dataclass
class NoisyReport:
    """The same scenario without and with a noisy user and a batch job (two clusters)."""

    quiet: ClusterReport
    noisy: ClusterReport

    @property
    def excess(self) -> dict[str, int]:
        """Both runs' excess at the providers, summed by limit (0 everywhere is the goal)."""
        return {k: v + self.noisy.excess[k] for k, v in self.quiet.excess.items()}

    @property
    def p99_ratio(self) -> float:
        """The ordinary users' p99 wait in the limiter with the noisy user and the batch
        job, over the same without them (inf when that was 0)."""
        before = self.quiet.load.wait_percentile(0.99)
        after = self.noisy.load.wait_percentile(0.99)
        return after / before if before > 0 else math.inf


def run_noisy(
    config: ClusterConfig,
    *,
    console: Console | None = None,
    noisy: int = 20,
    batch_workers: int | None = None,
) -> NoisyReport:
    """Run ``config`` twice, on a fresh cluster each time (no window, record or fair-queue
    state carried over): as is, then with a noisy user meaning to send ``noisy`` times the
    messages of the others and a batch job keeping ``batch_workers`` items in flight at
    priority 0 (default: twice OpenAI's concurrency)."""
    console = console or Console()
    workers = 2 * config.openai_concurrent if batch_workers is None else batch_workers
    console.rule("1/2: the users alone")
    quiet = run_cluster(replace(config, noisy=0, batch_workers=0), console=console)
    console.rule(f"2/2: the same users, with a noisy user (x{noisy}) and a batch job")
    loud = run_cluster(replace(config, noisy=noisy, batch_workers=workers), console=console)
    return NoisyReport(quiet, loud)


def print_noisy_report(report: NoisyReport, console: Console) -> None:
    """Both runs' reports, then the ordinary users' waits side by side."""
    console.print()
    console.rule("1/2: the users alone")
    print_report(report.quiet, console)
    console.print()
    console.rule("2/2: with the noisy user and the batch job")
    print_report(report.noisy, console)
    c = report.quiet.config
    console.print()
    table = Table(
        title=f"The {c.users} ordinary users: per message, the wait in the limiter "
        "(OpenAI + Zapier) and the time to answer"
    )
    table.add_column(f"{c.users} users x {c.messages}", no_wrap=True)
    for col in ("wait p50", "wait p99", "answer p50", "answer p99", "excess"):
        table.add_column(col, justify="right")
    runs = (("without the noisy user", report.quiet), ("with the noisy user", report.noisy))
    for name, run in runs:
        load, excess = run.load, sum(run.excess.values())
        style = "green" if excess == 0 else "red"
        table.add_row(
            name,
            f"{load.wait_percentile(0.5):.2f}s",
            f"{load.wait_percentile(0.99):.2f}s",
            f"{load.percentile(0.5):.2f}s",
            f"{load.percentile(0.99):.2f}s",
            f"[{style}]{excess}[/]",
        )
    console.print(table)
    noisy, batch, n = report.noisy.load.noisy, report.noisy.load.batch, report.noisy.config
    if noisy is not None:
        console.print(
            f"{NOISY_USER} meant to send {noisy.planned} messages ({n.noisy} x {c.messages}), "
            f"{n.noisy_in_flight} at a time, while the others ran: sent {noisy.sent}, "
            f"answered {noisy.answered}, errors {json.dumps(noisy.errors) if noisy.errors else 0}"
            f" (wait p50 {noisy.wait_percentile(0.5):.2f}s, answer p50 "
            f"{noisy.percentile(0.5):.2f}s). Its turn answers one of its messages at a time, "
            f"so it has one call at most in the limiter's queue, one tenant among "
            f"{c.users + 1} at priority 10."
        )
    if batch is not None:
        console.print(
            f"Batch job ({BATCH_JOB}, priority 0, {n.batch_workers} items in flight): "
            f"answered {batch.answered}, errors "
            f"{json.dumps(batch.errors) if batch.errors else 0} (wait p50 "
            f"{batch.wait_percentile(0.5):.2f}s, p99 {batch.wait_percentile(0.99):.2f}s): "
            "it gets what no waiting message wants."
        )
    console.print(
        f"The ordinary users' p99 wait with the noisy user is {report.p99_ratio:.2f}x the "
        "one without."
    )
    total = sum(report.excess.values())
    verdict = (
        "[green]0 excess at the providers in both runs" if total == 0 else "[red]LIMITS EXCEEDED"
    )
    console.print(f"[bold]{verdict}[/]")


def _summary(report: ClusterReport) -> dict[str, Any]:
    load = report.load
    return {
        "excess": report.excess,
        "openai_utilisation": report.openai_utilisation,
        "answered": load.answered,
        "errors": load.errors,
        "elapsed": load.elapsed,
        "p50": load.percentile(0.5),
        "p99": load.percentile(0.99),
        "wait_p50": load.wait_percentile(0.5),
        "wait_p99": load.wait_percentile(0.99),
    }


def _noisy_summary(report: NoisyReport) -> dict[str, Any]:
    out: dict[str, Any] = {"without": _summary(report.quiet), "with": _summary(report.noisy)}
    loud = report.noisy.load
    for name, extra in (("noisy_user", loud.noisy), ("batch", loud.batch)):
        if extra is not None:
            out[name] = {
                "planned": extra.planned,
                "sent": extra.sent,
                "answered": extra.answered,
                "errors": extra.errors,
                "wait_p50": extra.wait_percentile(0.5),
                "wait_p99": extra.wait_percentile(0.99),
            }
    out["p99_ratio"] = report.p99_ratio
    return out


def print_report(report: ClusterReport, console: Console) -> None:
    c, load = report.config, report.load
    console.print()
    table = Table(title="Users' view")
    for col in (
        "replicas",
        "users x messages",
        "answered",
        "errors",
        "time",
        "msg/s",
        "p50",
        "p99",
    ):
        table.add_column(col, justify="right")
    table.add_row(
        str(c.replicas),
        f"{c.users} x {c.messages}",
        str(load.answered),
        json.dumps(load.errors) if load.errors else "0",
        f"{load.elapsed:.1f}s",
        f"{load.answered / load.elapsed:.2f}",
        f"{load.percentile(0.5):.2f}s",
        f"{load.percentile(0.99):.2f}s",
    )
    console.print(table)
    o, z = report.openai, report.zapier
    referee = Table(title="Providers' own records (the referee)")
    for col in ("limit", "allowed", "max seen", "excess"):
        referee.add_column(col, justify="right")
    ow, zm, zh = f"{c.openai_window:g}s", f"{c.zapier_minute:g}s", f"{c.zapier_hour:g}s"
    rows = [
        ("OpenAI in flight", c.openai_concurrent, o["max_in_flight"]),
        (f"OpenAI per {ow} window", c.openai_per_window, o["max_requests_in_window"]),
        ("Zapier in flight", c.zapier_concurrent, z["max_concurrent"]),
        (f"Zapier per {zm} window", c.zapier_per_minute, z["max_starts_in_minute_window"]),
        (f"Zapier per {zh} window", c.zapier_per_hour, z["max_starts_in_hour_window"]),
    ]
    for name, allowed, seen in rows:
        excess = max(0, seen - allowed)
        style = "green" if excess == 0 else "red"
        referee.add_row(name, str(allowed), str(seen), f"[{style}]{excess}[/]")
    referee.add_row("OpenAI 429s", "0", str(o["rejected_total"]), str(o["rejected_total"]))
    referee.add_row("Zapier 429s", "0", str(z["rejected_429"]), str(z["rejected_429"]))
    console.print(referee)
    console.print(
        f"OpenAI admitted {o['admitted']} requests; while its window held requests back, "
        f"that was {report.openai_utilisation:.1%} of what its {c.openai_per_window} per "
        f"{c.openai_window:g}s window allows. Zapier executed {z['executed']} actions."
    )
    if report.killed:
        console.print(
            f"{report.killed} was SIGKILLed mid-run; its slots came back by lease; "
            f"{load.resent} messages were sent again to another replica."
        )
    total_excess = sum(report.excess.values())
    verdict = "[green]0 excess at the providers" if total_excess == 0 else "[red]LIMITS EXCEEDED"
    console.print(f"[bold]{verdict}[/]")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m chatbot cluster")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--users", type=int, default=30)
    parser.add_argument("--messages", type=int, default=8)
    parser.add_argument("--kill-one", action="store_true", help="SIGKILL a replica mid-run")
    parser.add_argument(
        "--noisy-user",
        action="store_true",
        help="run twice: as is, then with a user sending 20x the others' messages and a "
        "batch job at priority 0; compare the others' waits",
    )
    parser.add_argument(
        "--noisy-factor", type=int, default=20, help="the noisy user's messages, x the others'"
    )
    parser.add_argument(
        "--batch-workers",
        type=int,
        default=None,
        help="batch items in flight (default: twice OpenAI's concurrency)",
    )
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if args.noisy_user and args.kill_one:
        parser.error("--noisy-user and --kill-one do not go together")
    config = ClusterConfig(replicas=args.replicas, users=args.users, messages=args.messages)
    console = Console()
    if args.noisy_user:
        noisy = run_noisy(
            config, console=console, noisy=args.noisy_factor, batch_workers=args.batch_workers
        )
        print_noisy_report(noisy, console)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(_noisy_summary(noisy), fh, indent=2)
        return 0 if sum(noisy.excess.values()) == 0 else 1
    report = run_cluster(config, console=console, kill_one=args.kill_one)
    print_report(report, console)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_summary(report), fh, indent=2)
    return 0 if sum(report.excess.values()) == 0 else 1
