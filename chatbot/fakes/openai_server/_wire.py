"""The HTTP shapes every endpoint of the fake shares: error bodies, ids, SSE lines, held responses.

Owns nothing stateful. Called by ``_limits`` (the 401 and 429 answers), ``_chat`` and
``_responses`` (ids, request-id headers, streamed events, responses that hold a slot) and
``_app`` (embeddings, models, admin errors).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

__all__ = [
    "HeldJSONResponse",
    "HeldStreamingResponse",
    "error",
    "new_id",
    "sse",
    "with_request_id",
]


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def error(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=with_request_id(headers))


def with_request_id(headers: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**(headers or {}), "x-request-id": new_id("req_"), "openai-version": "2020-10-01"}


class _HeldMixin:
    """Calls ``on_done`` once the whole response has been sent, or the sending ended."""

    on_done: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            done, self.on_done = self.on_done, None
            if done is not None:
                done()


class HeldJSONResponse(_HeldMixin, JSONResponse):
    pass


class HeldStreamingResponse(_HeldMixin, StreamingResponse):
    pass


def sse(data: Mapping[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"
