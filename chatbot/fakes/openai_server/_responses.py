"""``POST /v1/responses``: the Responses API (the Agents SDK's default), streaming too.

Owns the translation of ``instructions`` and ``input`` items into chat messages, the
response object, its output items and the stream of ``response.*`` events. Called by
``_app`` (the route); the reply comes from ``_model``, admission and the hold on the slot
from ``_limits``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from ._limits import FakeOpenAI, authed_body, bad_request, held
from ._model import Reply, ToolSpec, decide, output_cap, pieces, text_of, truncate
from ._wire import HeldJSONResponse, HeldStreamingResponse, new_id, sse, with_request_id

__all__ = ["handle_responses"]


def _responses_specs(tools: Any) -> list[ToolSpec]:
    specs = []
    for tool in tools if isinstance(tools, list) else []:
        if isinstance(tool, dict) and tool.get("type") == "function" and tool.get("name"):
            params = tool.get("parameters")
            specs.append(ToolSpec(str(tool["name"]), params if isinstance(params, dict) else {}))
    return specs


def _responses_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The Responses API's ``instructions`` and ``input`` items as chat messages."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind in (None, "message") and "role" in item:
            messages.append({"role": item["role"], "content": text_of(item.get("content"))})
        elif kind == "function_call":
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments", "")},
            }
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id"),
                    "content": output if isinstance(output, str) else text_of(output),
                }
            )
    return messages


def _responses_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def _response_object(
    body: Mapping[str, Any],
    resp_id: str,
    model: str,
    created: float,
    status: str,
    output: list[dict[str, Any]],
    usage: Mapping[str, Any] | None,
    incomplete: bool,
) -> dict[str, Any]:
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "model": model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": usage,
        "user": None,
    }


def _output_item(reply: Reply, text: str | None, item_id: str, status: str) -> dict[str, Any]:
    if reply.tool is not None:
        call_id, name, args = reply.tool
        return {
            "id": item_id,
            "type": "function_call",
            "status": status,
            "call_id": call_id,
            "name": name,
            "arguments": args if status == "completed" else "",
        }
    content = (
        [{"type": "output_text", "text": text or "", "annotations": [], "logprobs": []}]
        if status == "completed"
        else []
    )
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


async def _responses_stream(
    fake: FakeOpenAI,
    reply: Reply,
    text: str | None,
    item_id: str,
    shell: Callable[[str, list[dict[str, Any]], Mapping[str, Any] | None], dict[str, Any]],
    final_status: str,
    usage: Mapping[str, Any],
) -> AsyncIterator[str]:
    cfg = fake.config
    seq = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> str:
        return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

    await asyncio.sleep(cfg.latency)
    yield event("response.created", response=shell("in_progress", [], None))
    yield event("response.in_progress", response=shell("in_progress", [], None))
    at = {"item_id": item_id, "output_index": 0}
    yield event(
        "response.output_item.added",
        output_index=0,
        item=_output_item(reply, text, item_id, "in_progress"),
    )
    if reply.tool is not None:
        _, name, args = reply.tool
        for piece in pieces(args, cfg.stream_chunk_chars):
            await asyncio.sleep(cfg.chunk_latency)
            yield event("response.function_call_arguments.delta", delta=piece, **at)
        yield event("response.function_call_arguments.done", arguments=args, name=name, **at)
    else:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        yield event("response.content_part.added", content_index=0, part=part, **at)
        for piece in pieces(text or "", cfg.stream_chunk_chars):
            await asyncio.sleep(cfg.chunk_latency)
            yield event(
                "response.output_text.delta", content_index=0, delta=piece, logprobs=[], **at
            )
        yield event("response.output_text.done", content_index=0, text=text, logprobs=[], **at)
        part = {**part, "text": text or ""}
        yield event("response.content_part.done", content_index=0, part=part, **at)
    await asyncio.sleep(cfg.chunk_latency)
    item = _output_item(reply, text, item_id, "completed")
    yield event("response.output_item.done", output_index=0, item=item)
    kind = "response.completed" if final_status == "completed" else "response.incomplete"
    yield event(kind, response=shell(final_status, [item], usage))


async def handle_responses(fake: FakeOpenAI, request: Request) -> Response:
    endpoint = "/v1/responses"
    parsed = await authed_body(fake, request)
    if not isinstance(parsed, tuple):
        return parsed
    key, body = parsed
    if not isinstance(body.get("input"), str | list):
        return bad_request(fake, "'input' must be a string or an array of items.", "input")
    cfg = fake.config
    model = str(body.get("model") or cfg.model)
    messages = _responses_messages(body)
    reply = decide(
        messages,
        _responses_specs(body.get("tools")),
        body.get("tool_choice"),
        body.get("tools"),
        cfg.tool_keywords,
    )
    cap = output_cap(body, "max_output_tokens")
    text, completion, cut = truncate(reply, cap)
    usage = _responses_usage(reply.prompt_tokens, completion)
    admitted = fake.admit(key, endpoint, model, max(cap or 0, reply.prompt_tokens))
    if not isinstance(admitted, tuple):
        return admitted
    adm, headers = admitted
    headers = with_request_id(headers)
    total = reply.prompt_tokens + completion
    try:
        resp_id = new_id("resp_")
        created = time.time()
        item_id = new_id("fc_" if reply.tool else "msg_")
        status = "incomplete" if cut else "completed"

        def shell(
            state: str, output: list[dict[str, Any]], use: Mapping[str, Any] | None
        ) -> dict[str, Any]:
            return _response_object(body, resp_id, model, created, state, output, use, cut)

        if body.get("stream"):
            stream = _responses_stream(fake, reply, text, item_id, shell, status, usage)
            return held(
                fake,
                adm,
                total,
                HeldStreamingResponse(stream, media_type="text/event-stream", headers=headers),
            )
        await asyncio.sleep(cfg.latency)
        payload = shell(status, [_output_item(reply, text, item_id, "completed")], usage)
        return held(fake, adm, total, HeldJSONResponse(payload, headers=headers))
    except BaseException:
        fake.finish(adm, total)
        raise
