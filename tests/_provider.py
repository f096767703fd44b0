"""Provider answers as the real SDKs raise them: httpx2 responses, openai errors."""

from __future__ import annotations

from typing import Any

import httpx2
import openai

URL = "http://127.0.0.1:9/v1/chat/completions"


def _response(status: int, headers: dict[str, str] | None = None, body: Any = None) -> Any:
    request = httpx2.Request("POST", URL)
    if body is None:
        return httpx2.Response(status, headers=headers, request=request)
    return httpx2.Response(status, headers=headers, json=body, request=request)


def _sdk_error(status: int, headers: dict[str, str] | None = None, body: Any = None) -> Exception:
    """The exception the openai SDK itself raises for this response."""
    client = openai.AsyncOpenAI(api_key="sk-test-not-a-secret", base_url="http://127.0.0.1:9/v1")
    return client._make_status_error_from_response(_response(status, headers, body))


def _err(code: str, message: str = "m", type_: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or code, "code": code, "param": None}}


RATE_LIMITED = _err("rate_limit_exceeded", "Rate limit reached for gpt-4o in organization org-x")
QUOTA = _err("insufficient_quota", "You exceeded your current quota", "insufficient_quota")
TOO_LARGE = _err(
    "rate_limit_exceeded",
    "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 50000.",
    "tokens",
)
