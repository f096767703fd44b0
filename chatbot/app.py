"""The chatbot: a stateless FastAPI replica. History lives in Redis; limits too."""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import openai
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator
from redis.exceptions import RedisError

from limiter import AcquireTimeout, APILimits, Limiter, LimiterError, LimiterUnavailable
from limiter.http import ProviderAuthError

from .agent import Agent, ToolsUnavailable, tenant_for
from .metrics import Metrics
from .settings import Settings

__all__ = ["BatchIn", "MessageIn", "create_app"]

log = logging.getLogger("chatbot")


def _unicode(value: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"): no UTF-8 for Redis or the SDK.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (a lone surrogate is not)") from None
    return value


class MessageIn(BaseModel):
    """``POST /messages`` body."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=8000)
    images: list[AnyHttpUrl] = Field(default_factory=list, max_length=4)

    @field_validator("user_id", "text")
    @classmethod
    def _utf8(cls, value: str) -> str:
        return _unicode(value)


class BatchIn(BaseModel):
    """``POST /batch`` body: one item of a batch job, answered without history."""

    model_config = ConfigDict(extra="forbid")

    #: The job: its tenant in the limiter's fair queue (all its items share one).
    job: str = Field(default="batch-jobs", min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=8000)
    images: list[AnyHttpUrl] = Field(default_factory=list, max_length=4)

    @field_validator("job", "text")
    @classmethod
    def _utf8(cls, value: str) -> str:
        return _unicode(value)


#: Seconds each limiter admission of the request being answered waited (the listener of
#: create_app adds to it, in whichever task the admission runs: they share this list).
_WAITS: ContextVar[list[float] | None] = ContextVar("chatbot_limiter_waits", default=None)


def _on_limiter_event(event: str, api: str, fields: dict[str, Any]) -> None:
    if event == "admitted":
        waits = _WAITS.get()
        if waits is not None:
            waits.append(fields["waited"])


@contextmanager
def _limiter_waits() -> Iterator[list[float]]:
    """The waits of the admissions made within the block, as they happen."""
    waits: list[float] = []
    token = _WAITS.set(waits)
    try:
        yield waits
    finally:
        _WAITS.reset(token)


def _printable(value: Any) -> Any:
    """An invalid input as a 422 can show it: bytes decoded, lone surrogates replaced."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, dict):
        return {str(_printable(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


async def _invalid_body(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, made safe for bodies that are not UTF-8 (its own handler raised)."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for e in exc.errors():
        error = dict(e)
        if "input" in error:
            error["input"] = _printable(error["input"])
        if isinstance(error.get("ctx"), dict):
            error["ctx"] = {k: _printable(str(v)) for k, v in error["ctx"].items()}
        errors.append(error)
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


class Store:
    """Conversation history per user, in Redis (so any replica serves any user)."""

    def __init__(self, redis: Any, namespace: str, keep: int) -> None:
        self.redis = redis
        self.prefix = f"{namespace}:chat"
        self.keep = keep

    def _key(self, user: str) -> str:
        return f"{self.prefix}:{{{user}}}:history"

    async def load(self, user: str) -> list[dict[str, Any]]:
        raw = await self.redis.lrange(self._key(user), -self.keep, -1)
        return [json.loads(item) for item in raw]

    async def append(self, user: str, *messages: dict[str, Any]) -> None:
        key = self._key(user)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, *[json.dumps(m) for m in messages])
        pipe.ltrim(key, -self.keep, -1)
        pipe.expire(key, 86_400)
        await pipe.execute()


@dataclass(frozen=True, slots=True)
class _Failed:
    """A request that failed: its status for chatbot_messages and its response."""

    status: str
    response: JSONResponse


def create_app(settings: Settings | None = None) -> FastAPI:
    """One replica. Settings default to the environment (see chatbot.settings)."""
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lim = Limiter.from_url(
            settings.redis_url,
            settings.limits,
            namespace=settings.namespace,
            ticket_ttl=settings.ticket_ttl,
        )
        # One user's messages are answered in order: a slot per user, FIFO across replicas.
        turns = Limiter(
            lim.redis,
            {
                "conversation": APILimits(
                    max_concurrent=1,
                    acquire_timeout=settings.message_timeout,
                    lease_ttl=settings.turn_lease,
                )
            },
            namespace=f"{settings.namespace}-turns",
            ticket_ttl=settings.ticket_ttl,
        )
        app.state.limiter = lim
        app.state.turns = turns
        app.state.store = Store(lim.redis, settings.namespace, settings.history)
        app.state.agent = Agent(lim, settings)
        app.state.metrics = Metrics(lim)
        lim.add_listener(_on_limiter_event)
        # Start-up objects never die: keep them out of the collector's full passes, whose
        # pauses delay a just-admitted request on its way to the provider.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await app.state.agent.aclose()
            await turns.aclose()
            await lim.aclose()

    app = FastAPI(title="fleetlimit chatbot", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _invalid_body)
    app.state.settings = settings

    async def respond(work: Callable[[], Awaitable[dict[str, Any]]], started: float) -> Any:
        """``work()``'s body with the replica, the seconds taken and the seconds its
        admissions waited in the limiter (``limiter_wait``), or the error as a response."""
        try:
            with _limiter_waits() as waits:
                body = await work()
            body["replica"] = settings.replica
            body["seconds"] = round(time.monotonic() - started, 3)
            body["limiter_wait"] = round(sum(waits), 3)
            return body
        except AcquireTimeout as exc:
            return _Failed(
                "timeout",
                JSONResponse(
                    {"detail": str(exc), "reason": exc.reason},
                    status_code=503,
                    headers={"retry-after": "5"},
                ),
            )
        except (LimiterUnavailable, RedisError) as exc:
            detail = f"limiter unavailable: {exc}"
            return _Failed("unavailable", JSONResponse({"detail": detail}, status_code=503))
        except (ProviderAuthError, ToolsUnavailable) as exc:
            return _Failed("provider_error", JSONResponse({"detail": str(exc)}, status_code=502))
        except openai.APIStatusError as exc:
            detail = f"OpenAI answered HTTP {exc.status_code}"
            return _Failed("provider_error", JSONResponse({"detail": detail}, status_code=502))
        except (openai.APIConnectionError, LimiterError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            return _Failed("provider_error", JSONResponse({"detail": detail}, status_code=502))

    @app.post("/messages")
    async def post_message(message: MessageIn, request: Request) -> Any:
        """A user's message, answered in turn (one at a time per user, in order), its
        OpenAI and Zapier calls queued as the user's tenant at the interactive priority."""
        state = request.app.state
        started = time.monotonic()

        async def work() -> dict[str, Any]:
            async with state.turns.slot("conversation", key=message.user_id):
                history = await state.store.load(message.user_id)
                images = [str(url) for url in message.images]
                answer = await state.agent.reply(
                    history,
                    message.text,
                    images,
                    tenant=tenant_for(message.user_id),
                    priority=settings.interactive_priority,
                )
                await state.store.append(
                    message.user_id,
                    {"role": "user", "content": message.text},
                    {"role": "assistant", "content": answer.text},
                )
            return {
                "user_id": message.user_id,
                "reply": answer.text,
                "tool_calls": answer.tool_calls,
            }

        status = "ok"
        try:
            out = await respond(work, started)
            status = out.status if isinstance(out, _Failed) else "ok"
            return out.response if isinstance(out, _Failed) else out
        finally:
            state.metrics.messages.labels(status).inc()
            state.metrics.message_seconds.observe(time.monotonic() - started)

    @app.post("/batch")
    async def post_batch(item: BatchIn, request: Request) -> Any:
        """One item of a batch job: answered without history or turn, its OpenAI and
        Zapier calls queued as the job's tenant at the batch priority (served when no
        user's message waits). Not counted in chatbot_messages."""
        state = request.app.state

        async def work() -> dict[str, Any]:
            images = [str(url) for url in item.images]
            answer = await state.agent.reply(
                [],
                item.text,
                images,
                tenant=tenant_for(item.job),
                priority=settings.batch_priority,
            )
            return {"job": item.job, "reply": answer.text, "tool_calls": answer.tool_calls}

        out = await respond(work, time.monotonic())
        return out.response if isinstance(out, _Failed) else out

    @app.get("/health")
    async def health(request: Request) -> Any:
        state = request.app.state
        checks: dict[str, str] = {}
        try:
            await state.limiter.redis.ping()
            checks["redis"] = "ok"
        except RedisError as exc:
            checks["redis"] = f"unreachable ({type(exc).__name__})"
        checks.update(await state.agent.check())
        ok = all(v == "ok" for v in checks.values())
        body = {"status": "ok" if ok else "degraded", "replica": settings.replica, **checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(await request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats(request: Request) -> Any:
        return {"replica": settings.replica, "apis": await request.app.state.limiter.stats()}

    return app
