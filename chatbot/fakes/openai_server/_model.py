"""The scripted model: what the fake answers, and how many tokens it counts.

Owns the canned replies (echo the user, call a tool the user names, report a tool's
result), the tool-call arguments drawn from a tool's schema, token estimates, output caps
and the deterministic embeddings. Pure functions, no state, no HTTP. Called by ``_chat``
and ``_responses`` (:func:`decide`, :func:`truncate`, :func:`pieces`) and ``_app``
(:func:`embed`, :func:`count_tokens`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Reply",
    "ToolSpec",
    "count_tokens",
    "decide",
    "embed",
    "output_cap",
    "pieces",
    "text_of",
    "truncate",
]


def embed(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text`` (hash-derived; equal texts, equal vectors)."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend(
            int.from_bytes(digest[k : k + 4], "big") / 2**31 - 1.0 for k in range(0, 32, 4)
        )
        counter += 1
    vector = values[:dimensions]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def count_tokens(text: str) -> int:
    """About four characters a token, at least one for any text."""
    return max(1, (len(text) + 3) // 4) if text else 0


def text_of(content: Any) -> str:
    """The text of a message's content: a string or a list of parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                for name in ("text", "refusal", "output"):
                    value = part.get(name)
                    if isinstance(value, str):
                        parts.append(value)
                        break
        return " ".join(parts)
    return json.dumps(content)


def _summary(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


def _stable_id(prefix: str, *parts: Any) -> str:
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    return f"{prefix}{digest[:24]}"


def output_cap(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- replies

_STOPWORDS = frozenset(
    {"send", "create", "delete", "update", "find", "list", "make", "tool", "action", "with"}
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class Reply:
    """What the fake model answers: text, or one tool call; token counts before any cap."""

    text: str | None
    tool: tuple[str, str, str] | None  # (call id, name, JSON arguments)
    prompt_tokens: int
    completion_tokens: int


def _message_text(message: Mapping[str, Any]) -> str:
    text = text_of(message.get("content"))
    for call in message.get("tool_calls") or []:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            fn = call["function"]
            text += f" {fn.get('name', '')} {fn.get('arguments', '')}"
    return text


def _prompt_tokens(messages: Sequence[Mapping[str, Any]], tools: Any) -> int:
    """Input tokens: ~len/4 per message, 4 per message of overhead, 3 to prime the reply."""
    total = 3 + sum(4 + len(_message_text(m)) // 4 for m in messages)
    if tools:
        total += len(json.dumps(tools, separators=(",", ":"))) // 4
    return total


def _keywords(spec: ToolSpec, extra: Mapping[str, Sequence[str]]) -> list[str]:
    name = spec.name.lower()
    words = [name, name.replace("_", " ").replace("-", " ")]
    words += [p for p in re.split(r"[^a-z0-9]+", name) if len(p) >= 4 and p not in _STOPWORDS]
    words += [w.lower() for w in extra.get(spec.name, ())]
    return [w for w in words if w]


def _choose_tool(
    specs: Sequence[ToolSpec],
    tool_choice: Any,
    text: str,
    extra: Mapping[str, Sequence[str]],
) -> ToolSpec | None:
    if not specs or tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        forced = tool_choice.get("name")
        if isinstance(tool_choice.get("function"), dict):
            forced = tool_choice["function"].get("name")
        for spec in specs:
            if spec.name == forced:
                return spec
    lowered = text.lower()
    for spec in specs:
        if any(word in lowered for word in _keywords(spec, extra)):
            return spec
    return specs[0] if tool_choice == "required" else None


def _value_for(name: str, schema: Mapping[str, Any], text: str) -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "string":
        if "email" in name.lower() or name.lower() in {"to", "recipient"}:
            found = _EMAIL.search(text)
            return found.group(0) if found else "someone@example.com"
        return _summary(text) or name
    return {"integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}.get(kind, text)


def _arguments(parameters: Mapping[str, Any], text: str) -> str:
    """JSON arguments for a tool: every required property (all if none is marked required)."""
    props = parameters.get("properties")
    props = props if isinstance(props, dict) else {}
    required = parameters.get("required")
    names = required if isinstance(required, list) else list(props)
    args: dict[str, Any] = {}
    for name in names:
        schema = props.get(name)
        args[name] = _value_for(name, schema if isinstance(schema, dict) else {}, text)
    return json.dumps(args)


def decide(
    messages: Sequence[Mapping[str, Any]],
    specs: Sequence[ToolSpec],
    tool_choice: Any,
    tools_raw: Any,
    extra: Mapping[str, Sequence[str]],
) -> Reply:
    """The fake model: echo the user, call a tool the user mentions, report a tool's result."""
    prompt = _prompt_tokens(messages, tools_raw)
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        call_id = last.get("tool_call_id")
        name = "tool"
        for m in messages:
            for call in m.get("tool_calls") or []:
                if isinstance(call, dict) and call.get("id") == call_id:
                    name = str((call.get("function") or {}).get("name") or name)
        text = f"The {name} tool returned: {_summary(text_of(last.get('content')))}"
        return Reply(text, None, prompt, count_tokens(text))
    user_text = next(
        (text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    if last.get("role") == "user":
        spec = _choose_tool(specs, tool_choice, user_text, extra)
        if spec is not None:
            args = _arguments(spec.parameters, user_text)
            call_id = _stable_id("call_", list(messages), spec.name)
            return Reply(None, (call_id, spec.name, args), prompt, count_tokens(spec.name + args))
    text = f"You said: {_summary(user_text)}" if user_text else "Hello from the fake OpenAI API."
    return Reply(text, None, prompt, count_tokens(text))


def truncate(reply: Reply, cap: int | None) -> tuple[str | None, int, bool]:
    """(text, completion tokens, cut) once the output cap is applied."""
    if cap is None or reply.completion_tokens <= cap:
        return reply.text, reply.completion_tokens, False
    text = reply.text[: cap * 4] if reply.text is not None else None
    return text, cap, True


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]
