"""The app: routes, ``/v1/embeddings``, ``/v1/models``, the admin routes and the command line.

Owns :func:`create_app` (what tests and ``chatbot`` serve in-process) and :func:`main`
(``python -m chatbot.fakes.openai_server``, run by ``chatbot.cluster``, docker-compose and
the tests through ``__main__``). The completions endpoints are ``_chat`` and ``_responses``;
the limits and the record are ``_limits``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .._common import AnnouncingServer
from ._chat import handle_chat_completions
from ._config import DEFAULT_API_KEY, DEFAULT_MODEL, FakeOpenAIConfig
from ._limits import FakeOpenAI, authed_body, bad_request, held, json_body
from ._model import count_tokens, embed
from ._responses import handle_responses
from ._wire import HeldJSONResponse, error, with_request_id

__all__ = ["EMBEDDING_MODEL", "create_app", "main"]


EMBEDDING_MODEL = "text-embedding-3-small"


# --------------------------------------------------------------------------- embeddings


async def _embeddings(fake: FakeOpenAI, request: Request) -> Response:
    endpoint = "/v1/embeddings"
    parsed = await authed_body(fake, request)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    raw = body.get("input")
    items: list[Any]
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw)
    ):
        items = [raw]  # one text, or one array of tokens
    elif isinstance(raw, list) and raw and all(isinstance(x, str | list) for x in raw):
        items = raw
    else:
        return bad_request(
            fake, "'input' must be a string, an array of strings or tokens.", "input"
        )
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and dims > 0 else fake.config.embedding_dimensions
    model = str(body.get("model") or EMBEDDING_MODEL)
    texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in items]
    tokens = sum(count_tokens(x) if isinstance(x, str) else len(x) for x in items)
    admitted = fake.admit(key, endpoint, model, tokens)
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    try:
        await asyncio.sleep(fake.config.latency)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embed(text, dims)
            value: Any = vector
            if as_base64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        payload = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        response = HeldJSONResponse(payload, headers=with_request_id(headers))
        return held(fake, adm, tokens, response)
    except BaseException:
        fake.finish(adm, tokens)
        raise


# --------------------------------------------------------------------------- app


def _models(config: FakeOpenAIConfig) -> list[dict[str, Any]]:
    names = dict.fromkeys([config.model, "gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", EMBEDDING_MODEL])
    return [
        {"id": name, "object": "model", "created": 1_715_367_049, "owned_by": "system"}
        for name in names
    ]


def create_app(config: FakeOpenAIConfig | None = None) -> FastAPI:
    """The fake OpenAI API as a FastAPI app; its state is ``app.state.fake`` (a FakeOpenAI)."""
    fake = FakeOpenAI(config or FakeOpenAIConfig())
    app = FastAPI(title="fake-openai", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.fake = fake

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle_chat_completions(fake, request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        return await handle_responses(fake, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await _embeddings(fake, request)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        key = fake.authenticate(request)
        if not isinstance(key, str):
            return key
        body = {"object": "list", "data": _models(fake.config)}
        return JSONResponse(body, headers=with_request_id())

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str, request: Request) -> Response:
        key = fake.authenticate(request)
        if not isinstance(key, str):
            return key
        for entry in _models(fake.config):
            if entry["id"] == model:
                return JSONResponse(entry, headers=with_request_id())
        message = f"The model '{model}' does not exist or you do not have access to it."
        return error(404, message, "invalid_request_error", "model_not_found")

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def unknown(path: str, request: Request) -> Response:
        message = f"Invalid URL ({request.method} /v1/{path})"
        return error(404, message, "invalid_request_error", None)

    @app.get("/admin/record")
    async def get_record(detail: bool = True) -> dict[str, Any]:
        return fake.snapshot(detail=detail)

    @app.post("/admin/reset")
    async def reset() -> dict[str, Any]:
        fake.reset()
        return {"ok": True, "started_at": fake.record.started_at}

    @app.get("/admin/config")
    async def get_config() -> dict[str, Any]:
        return fake.config.to_json()

    @app.post("/admin/config")
    async def set_config(request: Request) -> Response:
        body = await json_body(fake, request)
        if not isinstance(body, dict):
            return body
        try:
            config = fake.reconfigure(body)
        except (TypeError, ValueError) as exc:
            return error(400, str(exc), "invalid_request_error", None)
        return JSONResponse(config.to_json())

    return app


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m chatbot.fakes.openai_server",
        description="A fake OpenAI API on 127.0.0.1 that enforces limits and records what it saw.",
    )
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1 (0: any free)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 only inside a container)"
    )
    p.add_argument("--max-in-flight", type=int, default=None)
    p.add_argument("--rpm", type=int, default=None, help="requests per window")
    p.add_argument("--tpm", type=int, default=None, help="tokens per window")
    p.add_argument("--window-seconds", type=float, default=60.0)
    p.add_argument("--quota", type=int, default=None, help="total requests before 429 quota")
    p.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    p.add_argument("--chunk-latency", type=float, default=0.0, help="seconds per stream chunk")
    p.add_argument("--scope", choices=["global", "key"], default="global")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument(
        "--api-key", action="append", default=None, help=f"repeatable; default {DEFAULT_API_KEY}"
    )
    p.add_argument("--any-key", action="store_true", help="accept any non-empty bearer key")
    p.add_argument(
        "--tool-keyword",
        action="append",
        default=[],
        metavar="TOOL=WORD",
        help="a word that makes a user message call TOOL (repeatable)",
    )
    p.add_argument(
        "--model-limit",
        action="append",
        default=[],
        metavar="MODEL=RPM[:TPM]",
        help="limits of MODEL, per key with --scope key, else across keys (repeatable)",
    )
    p.add_argument(
        "--key-limit",
        action="append",
        default=[],
        metavar="KEY=RPM[:TPM]",
        help="rpm (and tpm) of one API key instead of --rpm/--tpm; needs --scope key (repeatable)",
    )
    p.add_argument("--concurrency-retry-after", type=float, default=1.0)
    p.add_argument("--record-file", type=Path, default=None, help="write the record here on exit")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def _limit_flags(flag: str, values: Sequence[str]) -> dict[str, dict[str, int | None]]:
    """``NAME=RPM[:TPM]`` flags as a limit table (a later flag for the same name wins)."""
    table: dict[str, dict[str, int | None]] = {}
    for value in values:
        name, sep, limits = value.rpartition("=")
        rpm, colon, tpm = limits.partition(":")
        if not sep or not name or not rpm.isdigit() or (colon and not tpm.isdigit()):
            raise SystemExit(f"{flag} wants NAME=RPM[:TPM], got {value!r}")
        entry: dict[str, int | None] = {"rpm": int(rpm)}
        if colon:
            entry["tpm"] = int(tpm)
        table[name] = entry
    return table


def _config_from_args(args: argparse.Namespace) -> FakeOpenAIConfig:
    keywords: dict[str, list[str]] = {}
    for pair in args.tool_keyword:
        tool, sep, word = pair.partition("=")
        if not sep or not tool or not word:
            raise SystemExit(f"--tool-keyword wants TOOL=WORD, got {pair!r}")
        keywords.setdefault(tool, []).append(word)
    keys: Iterable[str] = () if args.any_key else (args.api_key or [DEFAULT_API_KEY])
    return FakeOpenAIConfig(
        api_keys=tuple(keys),
        max_in_flight=args.max_in_flight,
        rpm=args.rpm,
        tpm=args.tpm,
        window_seconds=args.window_seconds,
        quota=args.quota,
        latency=args.latency,
        chunk_latency=args.chunk_latency,
        scope=args.scope,
        model=args.model,
        tool_keywords={k: tuple(v) for k, v in keywords.items()},
        concurrency_retry_after=args.concurrency_retry_after,
        model_limits=_limit_flags("--model-limit", args.model_limit),
        key_limits=_limit_flags("--key-limit", args.key_limit),
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fake on 127.0.0.1 until SIGTERM or SIGINT; exit 0."""
    args = _parse_args(argv)
    try:
        config = _config_from_args(args)
    except ValueError as exc:
        print(f"fake-openai: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    # uvicorn catches SIGTERM/SIGINT to shut down gracefully, then re-raises the signal with
    # the handler it found: this one, so a stop by signal is a clean exit with status 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGINT, _exit_cleanly)
    server = AnnouncingServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=3,
        ),
        lambda port: f"fake-openai listening on http://127.0.0.1:{port}",
    )
    try:
        with contextlib.suppress(SystemExit):
            server.run()
    finally:
        if args.record_file is not None:
            args.record_file.write_text(json.dumps(app.state.fake.snapshot(), indent=2))
        print("fake-openai stopped", flush=True)
    return 0 if server.started else 1
