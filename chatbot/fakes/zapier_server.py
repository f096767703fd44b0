"""A fake Zapier MCP server: it enforces Zapier-like limits and referees what it saw.

The MCP side is the SDK's own server (`MCPServer`, streamable HTTP at ``/mcp``, bearer
auth through a token verifier). In front of it sits a gate, a plain ASGI middleware
that reads the JSON-RPC body of each authorized ``POST /mcp``: only ``tools/call``
costs a task; ``initialize``, ``tools/list``, notifications and the session's GET and
DELETE pass free. A tool call that would exceed the concurrency limit or a rolling
window is answered ``429`` (``retry-after``, ``retry-after-ms``) before the tool runs.
An admitted call holds its concurrency slot until its response stream has closed and
its tool has finished, whichever is later.

The referee record (``GET /admin/record``, ``POST /admin/reset``, both outside the MCP
auth) lists every executed tool call and the maxima it saw. This module is a referee
of the limiter: it imports nothing from ``limiter`` or the rest of ``chatbot``.

Run it as ``python -m chatbot.fakes.zapier_server --port 8766`` (``--port 0`` picks a
free port; the line ``fake-zapier listening on http://127.0.0.1:PORT/mcp`` says which).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import anyio
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._common import AnnouncingServer, max_in_window

__all__ = [
    "ADMISSION_HEADER",
    "Execution",
    "FakeZapierApp",
    "FakeZapierConfig",
    "Referee",
    "Rejection",
    "create_app",
    "main",
]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

MCP_PATH = "/mcp"
HOST = "127.0.0.1"
# The gate tells the tool which admission it runs under through this request header
# (the SDK hands the tool the HTTP request); a client's own copy is stripped.
ADMISSION_HEADER = b"x-fake-zapier-admission"
MAX_BODY_BYTES = 4 * 1024 * 1024
RATE_LIMITED_CODE = -32029  # a JSON-RPC server-error code for "429 rate limited"


@dataclass(frozen=True)
class FakeZapierConfig:
    """Limits, latency and token of one fake Zapier server.

    Windows are 60 s and 3600 s times ``window_scale``, unless ``minute_seconds`` /
    ``hour_seconds`` set them outright (tests use e.g. 1.0 and 3.0).
    """

    token: str = "fake-zapier-token"
    #: Address to bind; 0.0.0.0 only inside a container (it also turns off the SDK's
    #: DNS-rebinding protection, which only admits localhost Host headers).
    host: str = HOST
    max_concurrent: int = 3
    per_minute: int = 60
    per_hour: int = 75
    latency: float = 0.3
    window_scale: float = 1.0
    minute_seconds: float | None = None
    hour_seconds: float | None = None
    log_level: LogLevel = "WARNING"

    def __post_init__(self) -> None:
        if not self.token:
            raise ValueError("token must not be empty")
        if min(self.max_concurrent, self.per_minute, self.per_hour) < 1:
            raise ValueError("max_concurrent, per_minute and per_hour must be at least 1")
        if self.latency < 0 or self.window_scale <= 0:
            raise ValueError("latency must be >= 0 and window_scale > 0")
        for value in (self.minute_seconds, self.hour_seconds):
            if value is not None and value <= 0:
                raise ValueError("window lengths must be positive")

    @property
    def minute_window(self) -> float:
        """Length of the "per minute" window, in seconds."""
        if self.minute_seconds is not None:
            return self.minute_seconds
        return 60.0 * self.window_scale

    @property
    def hour_window(self) -> float:
        """Length of the "per hour" window, in seconds."""
        if self.hour_seconds is not None:
            return self.hour_seconds
        return 3600.0 * self.window_scale


@dataclass
class Execution:
    """One executed tool call; times are ``time.monotonic()`` seconds of this process.

    ``admitted`` is when the gate charged the call (for an ungated execution, its start).
    """

    id: int
    tool: str
    arguments: dict[str, Any]
    admitted: float
    start: float
    end: float | None = None
    gated: bool = True
    admission_id: int | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["admission_id"]
        return data


@dataclass(frozen=True)
class Rejection:
    """Why the gate refused a tool call, and how long until it could pass."""

    reasons: tuple[str, ...]
    retry_after: float


@dataclass
class _Admission:
    id: int
    admitted: float
    http_open: bool = True
    running: bool = False
    started: bool = False


class Referee:
    """Admission state of the gate plus the record of what ran.

    Everything runs on one event loop and no method awaits, so no lock is needed.
    A slot is in use while its admission's HTTP response is open or its tool runs;
    an admission whose tool never started is refunded from the windows.
    """

    def __init__(self, config: FakeZapierConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self._ids = itertools.count(1)  # admission ids
        self._execution_ids = itertools.count(1)
        self._admissions: dict[int, _Admission] = {}
        self._orphans_running = 0
        self.reset()

    def reset(self) -> None:
        """Forget the record and the windows; calls in flight keep their slots."""
        self._charged: list[tuple[float, int]] = []  # (time, id), sorted: the window log
        self.executions: list[Execution] = []
        self.admitted = 0
        self.rejected_429 = 0
        self.rejected_by_reason = {"concurrency": 0, "minute": 0, "hour": 0}
        self.unauthorized_401 = 0
        self.free_requests: dict[str, int] = {}
        self.max_in_flight = 0
        self.ungated = 0

    # -- the gate ---------------------------------------------------------------

    @property
    def in_use(self) -> int:
        """Concurrency slots in use: open admissions plus running ungated executions."""
        return len(self._admissions) + self._orphans_running

    def try_admit(self) -> int | Rejection:
        """Admit one tool call (return its admission id) or say why not (no slot, no charge)."""
        now = self.clock()
        self._prune(now)
        refusals: list[tuple[str, float]] = []
        if self.in_use >= self.config.max_concurrent:
            refusals.append(("concurrency", self._concurrency_wait(now)))
        for name, length, limit in self._windows():
            first = bisect.bisect_right(self._charged, (now - length, math.inf))
            count = len(self._charged) - first
            if count >= limit:
                oldest_to_leave = self._charged[first + count - limit][0]
                refusals.append((name, oldest_to_leave + length - now))
        if refusals:
            self.rejected_429 += 1
            for name, _ in refusals:
                self.rejected_by_reason[name] += 1
            return Rejection(tuple(name for name, _ in refusals), max(w for _, w in refusals))
        admission = _Admission(next(self._ids), now)
        self._admissions[admission.id] = admission
        self._charged.append((now, admission.id))
        self.admitted += 1
        self.max_in_flight = max(self.max_in_flight, self.in_use)
        return admission.id

    def http_done(self, admission_id: int) -> None:
        """The admitted call's HTTP response is over (idempotent)."""
        admission = self._admissions.get(admission_id)
        if admission is not None:
            admission.http_open = False
            self._maybe_finish(admission)

    def count_free(self, what: str) -> None:
        self.free_requests[what] = self.free_requests.get(what, 0) + 1

    def _windows(self) -> list[tuple[str, float, int]]:
        return [
            ("minute", self.config.minute_window, self.config.per_minute),
            ("hour", self.config.hour_window, self.config.per_hour),
        ]

    def _prune(self, now: float) -> None:
        horizon = now - max(self.config.minute_window, self.config.hour_window)
        cut = bisect.bisect_right(self._charged, (horizon, math.inf))
        if cut:
            del self._charged[:cut]

    def _concurrency_wait(self, now: float) -> float:
        ends = [e.start + self.config.latency for e in self.executions if e.end is None]
        wait = min(ends) - now if ends else self.config.latency
        return min(max(wait, 0.001), max(self.config.latency, 0.001))

    def _maybe_finish(self, admission: _Admission) -> None:
        if admission.http_open or admission.running:
            return
        del self._admissions[admission.id]
        if not admission.started:  # never ran: not a task, refund it
            entry = (admission.admitted, admission.id)
            index = bisect.bisect_left(self._charged, entry)
            if index < len(self._charged) and self._charged[index] == entry:
                del self._charged[index]
            self.admitted -= 1

    # -- the tools ----------------------------------------------------------------

    def execution_started(
        self, admission_id: int | None, tool: str, arguments: dict[str, Any]
    ) -> Execution:
        now = self.clock()
        admission = self._admissions.get(admission_id) if admission_id is not None else None
        if admission is not None and not admission.started:
            admission.started = admission.running = True
            execution = Execution(
                next(self._execution_ids), tool, arguments, admission.admitted, now
            )
            execution.admission_id = admission.id
        else:  # its request closed before it started, or it never passed the gate
            self._orphans_running += 1
            self.ungated += 1
            execution = Execution(next(self._execution_ids), tool, arguments, now, now, gated=False)
            bisect.insort(self._charged, (now, next(self._ids)))
        self.executions.append(execution)
        return execution

    def execution_ended(self, execution: Execution) -> None:
        execution.end = self.clock()
        if execution.admission_id is None:
            self._orphans_running -= 1
            return
        admission = self._admissions.get(execution.admission_id)
        if admission is not None:
            admission.running = False
            self._maybe_finish(admission)

    # -- the record ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The referee record as JSON-ready data."""
        cfg = self.config
        executions = list(self.executions)
        admitted = sorted(e.admitted for e in executions)
        starts = sorted(e.start for e in executions)
        return {
            "config": {
                "max_concurrent": cfg.max_concurrent,
                "per_minute": cfg.per_minute,
                "per_hour": cfg.per_hour,
                "minute_seconds": cfg.minute_window,
                "hour_seconds": cfg.hour_window,
                "latency": cfg.latency,
            },
            "now": self.clock(),
            "executions": [e.as_json() for e in executions],
            "executed": len(executions),
            "running": sum(1 for e in executions if e.end is None),
            "in_flight": self.in_use,
            "admitted": self.admitted,
            "ungated": self.ungated,
            "max_concurrent": max_overlap(executions),
            "max_in_flight": self.max_in_flight,
            "max_in_minute_window": max_in_window(admitted, cfg.minute_window),
            "max_in_hour_window": max_in_window(admitted, cfg.hour_window),
            "max_starts_in_minute_window": max_in_window(starts, cfg.minute_window),
            "max_starts_in_hour_window": max_in_window(starts, cfg.hour_window),
            "rejected_429": self.rejected_429,
            "rejected_429_by_reason": dict(self.rejected_by_reason),
            "unauthorized_401": self.unauthorized_401,
            "free_requests": dict(self.free_requests),
        }


def max_overlap(executions: list[Execution]) -> int:
    """Most executions running at one instant (an end at t frees before a start at t)."""
    events = [(e.start, 1) for e in executions]
    events += [(e.end, -1) for e in executions if e.end is not None]
    events.sort()  # at equal times -1 sorts before +1
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


class _StaticTokenVerifier:
    """Accepts exactly one bearer token."""

    def __init__(self, token: str):
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if token != self._token:
            return None
        return AccessToken(token=token, client_id="fake-zapier-user", scopes=[])


def _admission_of(ctx: Context) -> int | None:
    try:
        request = ctx.request_context.request
        value = request.headers.get(ADMISSION_HEADER.decode()) if request is not None else None
        return int(value) if value else None
    except (ValueError, AttributeError):
        return None


def _build_mcp_server(config: FakeZapierConfig, referee: Referee) -> MCPServer[Any]:
    server: MCPServer[Any] = MCPServer(
        "fake-zapier",
        instructions="Zapier-like actions. Each tools/call costs one task.",
        token_verifier=_StaticTokenVerifier(config.token),
        auth=AuthSettings(issuer_url=f"http://{HOST}/", resource_server_url=None),
        log_level=config.log_level,
    )

    async def execute(tool: str, arguments: dict[str, Any], ctx: Context) -> Execution:
        execution = referee.execution_started(_admission_of(ctx), tool, arguments)
        try:
            await anyio.sleep(config.latency)
        finally:
            referee.execution_ended(execution)
        return execution

    @server.tool(description="Send an email (Gmail: Send Email).")
    async def send_email(to: str, subject: str, body: str, ctx: Context) -> dict[str, Any]:
        args = {"to": to, "subject": subject, "body": body}
        execution = await execute("send_email", args, ctx)
        return {"status": "sent", "id": f"msg-{execution.id}", "to": to}

    @server.tool(description="Append a row to a spreadsheet (Google Sheets: Create Row).")
    async def add_spreadsheet_row(
        spreadsheet: str, values: list[str], ctx: Context
    ) -> dict[str, Any]:
        args = {"spreadsheet": spreadsheet, "values": values}
        execution = await execute("add_spreadsheet_row", args, ctx)
        return {"status": "added", "row_id": f"row-{execution.id}", "spreadsheet": spreadsheet}

    @server.tool(description="Create a calendar event (Google Calendar: Create Event).")
    async def create_calendar_event(title: str, start: str, ctx: Context) -> dict[str, Any]:
        args = {"title": title, "start": start}
        execution = await execute("create_calendar_event", args, ctx)
        return {"status": "created", "event_id": f"evt-{execution.id}", "title": title}

    return server


class FakeZapierApp:
    """The ASGI app: admin routes, the 429 gate, then the SDK's MCP app."""

    def __init__(self, config: FakeZapierConfig):
        self.config = config
        self.referee = Referee(config)
        self.mcp = _build_mcp_server(config, self.referee)
        self.mcp_app: ASGIApp = self.mcp.streamable_http_app(
            streamable_http_path=MCP_PATH, host=config.host
        )
        self._bearer = f"Bearer {config.token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan runs the SDK's session manager
            await self.mcp_app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path.startswith("/admin/"):
            await self._admin(path, method)(scope, receive, send)
            return
        watcher = _ResponseWatcher(send, self.referee)
        if path == MCP_PATH and method == "POST" and self._authorized(scope):
            await self._gate(scope, receive, watcher.send)
        else:
            if path == MCP_PATH and self._authorized(scope):
                self.referee.count_free(method)
            await self.mcp_app(scope, receive, watcher.send)
        await watcher.complete()  # only reached when the app returned normally

    def _admin(self, path: str, method: str) -> ASGIApp:
        if path == "/admin/record" and method == "GET":
            return JSONResponse(self.referee.snapshot())
        if path == "/admin/reset" and method == "POST":
            self.referee.reset()
            return JSONResponse({"reset": True})
        if path in ("/admin/record", "/admin/reset"):
            return JSONResponse({"error": "method not allowed"}, status_code=405)
        return JSONResponse({"error": "not found"}, status_code=404)

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                return bool(value[:7].lower() == b"bearer " and value[7:] == self._bearer[7:])
        return False

    async def _gate(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                await JSONResponse({"error": "body too large"}, status_code=413)(
                    scope, receive, send
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, list) and any(_is_tool_call(m) for m in payload):
            await JSONResponse({"error": "JSON-RPC batches are not supported"}, status_code=400)(
                scope, receive, send
            )
            return
        if not _is_tool_call(payload):
            method = payload.get("method") if isinstance(payload, dict) else None
            self.referee.count_free(str(method) if method else "other")
            await self.mcp_app(scope, replay, send)
            return

        decision = self.referee.try_admit()
        if isinstance(decision, Rejection):
            await _too_many_requests(payload.get("id"), decision)(scope, receive, send)
            return
        admission_id = decision
        headers = [(k, v) for k, v in scope["headers"] if k != ADMISSION_HEADER]
        headers.append((ADMISSION_HEADER, str(admission_id).encode()))
        scope = {**scope, "headers": headers}

        async def tracking_send(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.referee.http_done(admission_id)

        try:
            await self.mcp_app(scope, replay, tracking_send)
        finally:
            self.referee.http_done(admission_id)


class _ResponseWatcher:
    """Counts 401s, and ends a response the app left open (the SDK's GET stream at shutdown)."""

    def __init__(self, send: Send, referee: Referee):
        self._send = send
        self._referee = referee
        self.started = self.completed = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] == 401:
                self._referee.unauthorized_401 += 1
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.completed = True
        await self._send(message)

    async def complete(self) -> None:
        if self.started and not self.completed:
            with contextlib.suppress(OSError, RuntimeError):
                await self.send({"type": "http.response.body", "body": b"", "more_body": False})


def _is_tool_call(message: Any) -> bool:
    return isinstance(message, dict) and message.get("method") == "tools/call"


def _too_many_requests(request_id: Any, rejection: Rejection) -> JSONResponse:
    wait = max(rejection.retry_after, 0.001)
    reasons = ", ".join(rejection.reasons)
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": RATE_LIMITED_CODE,
            "message": f"429 Too Many Requests: Zapier task limit ({reasons}); "
            f"retry after {wait:.3f}s",
            "data": {"reasons": list(rejection.reasons), "retry_after_ms": math.ceil(wait * 1000)},
        },
    }
    headers = {
        "retry-after": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
    return JSONResponse(body, status_code=429, headers=headers)


def create_app(config: FakeZapierConfig | None = None) -> FakeZapierApp:
    """A fresh fake Zapier ASGI app (serve it once: the SDK's session manager runs once)."""
    return FakeZapierApp(config or FakeZapierConfig())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = FakeZapierConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--host", default=HOST, help="address to bind (0.0.0.0 in a container)")
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent)
    parser.add_argument("--per-minute", type=int, default=defaults.per_minute)
    parser.add_argument("--per-hour", type=int, default=defaults.per_hour)
    parser.add_argument("--latency", type=float, default=defaults.latency, help="seconds")
    parser.add_argument("--token", default=defaults.token)
    parser.add_argument("--window-scale", type=float, default=defaults.window_scale)
    parser.add_argument("--minute-seconds", type=float, default=None)
    parser.add_argument("--hour-seconds", type=float, default=None)
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    config = FakeZapierConfig(
        token=args.token,
        host=args.host,
        max_concurrent=args.max_concurrent,
        per_minute=args.per_minute,
        per_hour=args.per_hour,
        latency=args.latency,
        window_scale=args.window_scale,
        minute_seconds=args.minute_seconds,
        hour_seconds=args.hour_seconds,
        log_level=args.log_level.upper(),
    )
    server = AnnouncingServer(
        uvicorn.Config(
            create_app(config),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,  # open SSE GET streams would hold shutdown forever
        ),
        lambda port: f"fake-zapier listening on http://{HOST}:{port}{MCP_PATH}",
    )
    await server.serve()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM or SIGINT, then exit 0."""
    args = _parse_args(argv)
    # uvicorn re-raises a captured signal after its graceful shutdown, under the
    # handlers that were there before: make those no-ops so SIGTERM exits with 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
