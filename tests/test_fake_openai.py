"""The fake OpenAI server, served by uvicorn on 127.0.0.1 and driven by the real openai SDK.

The record at ``GET /admin/record`` (times are ``time.monotonic`` seconds)::

    {"clock": "time.monotonic", "started_at": float, "now": float, "window_seconds": float,
     "limits": {"scope", "max_in_flight", "rpm", "tpm", "quota", "model_limits",
                "key_limits"},
     "requests_total": int, "admitted": int, "completed": int, "in_flight": int,
     "max_in_flight": int, "max_requests_in_window": int, "max_tokens_in_window": int,
     "max_charged_tokens_in_window": int, "tokens_charged": int, "tokens_used": int,
     "rejected": {"concurrency", "requests", "tokens", "request_too_large",
                  "insufficient_quota": int}, "rejected_total": int,
     "unauthorized": int, "bad_requests": int, "by_endpoint": {path: int},
     "by_key": {masked key: {...}}, "by_model": {model: {...}},
     "by_key_model": {"<masked key>|<model>": {...}},
     # unless ?detail=false:
     "arrivals": [float],
     "admissions": [{"t", "done", "key", "endpoint", "charged", "tokens", "model"}],
     "rejections": [{"t", "reason", "key", "endpoint", "model", "bucket"}]}

(Per-model and per-key limits: ``tests/test_fake_openai_models.py``.)
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from chatbot.fakes.openai_server import (
    DEFAULT_API_KEY,
    FakeOpenAIConfig,
    embed,
    go_duration,
    max_in_window,
)
from tests._servers import serve_fake_openai as serve

KEY = DEFAULT_API_KEY
MODEL = "gpt-4o-mini"
ROOT = Path(__file__).resolve().parent.parent

EMAIL_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "to": {"type": "string"},
        "subject": {"type": "string"},
        "urgent": {"type": "boolean"},
    },
    "required": ["to", "subject"],
}
EMAIL_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "send_email",
        "description": "Send an email.",
        "parameters": EMAIL_PARAMETERS,
    },
}
SHEET_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "add_spreadsheet_row",
        "parameters": {"type": "object", "properties": {"row": {"type": "string"}}},
    },
}


def chat(
    client: openai.AsyncOpenAI, text: str = "hi", **kwargs: Any
) -> Any:  # a coroutine of ChatCompletion
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], **kwargs
    )


def prompt_tokens(*texts: str) -> int:
    """The fake's documented estimate: 3, plus 4 and len // 4 per message."""
    return 3 + sum(4 + len(t) // 4 for t in texts)


async def test_chat_completion_echoes_and_reports_usage_and_limit_headers() -> None:
    """A completion echoes the user, counts usage, and carries x-ratelimit-* headers."""
    async with serve(FakeOpenAIConfig(rpm=100, tpm=10_000)) as run, run.client() as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello,   fake\nworld!"},
            ],
            max_tokens=50,
        )
        completion = raw.parse()
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content == "You said: Hello, fake world!"
        assert completion.choices[0].finish_reason == "stop"
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens == prompt_tokens("You are terse.", "Hello,   fake\nworld!")
        assert usage.completion_tokens == math.ceil(len("You said: Hello, fake world!") / 4)
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert raw.headers["x-ratelimit-remaining-requests"] == "99"
        assert raw.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
        assert raw.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 50)  # the cap

        # The first request was corrected to its real usage once answered.
        second = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "again"}], max_tokens=50
        )
        remaining = 10_000 - usage.total_tokens - 50
        assert second.headers["x-ratelimit-remaining-tokens"] == str(remaining)

        capped = await chat(client, "a long sentence to be cut short", max_tokens=2)
        assert capped.choices[0].finish_reason == "length"
        assert capped.choices[0].message.content == "You said"
        assert capped.usage is not None
        assert capped.usage.completion_tokens == 2


async def test_streaming_ends_with_a_usage_chunk_when_asked() -> None:
    """A stream delivers the reply in chunks and, with include_usage, a final usage chunk."""
    async with serve(FakeOpenAIConfig()) as run, run.client() as client:
        stream = await chat(
            client, "stream this please", stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "You said: stream this please"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        last = chunks[-1]
        assert last.choices == []
        assert last.usage is not None
        assert last.usage.prompt_tokens == prompt_tokens("stream this please")
        assert last.usage.completion_tokens == math.ceil(len(text) / 4)
        assert all(c.usage is None for c in chunks[:-1])

        plain = await chat(client, "no usage", stream=True)
        assert all(c.usage is None and c.choices for c in [c async for c in plain])


async def test_tool_call_round_trip() -> None:
    """A user message naming a tool gets a tool call; the tool's result gets plain text."""
    async with serve(FakeOpenAIConfig()) as run, run.client() as client:
        messages: list[Any] = [
            {"role": "user", "content": "Please email bob@example.com about the launch"}
        ]
        first = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[SHEET_TOOL, EMAIL_TOOL]
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        assert choice.message.tool_calls is not None
        call = choice.message.tool_calls[0]
        assert call.type == "function"
        assert call.function.name == "send_email"
        args = json.loads(call.function.arguments)
        assert args == {"to": "bob@example.com", "subject": messages[0]["content"]}

        messages += [
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sent, id 42"},
        ]
        second = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=[SHEET_TOOL, EMAIL_TOOL]
        )
        assert second.choices[0].finish_reason == "stop"
        assert second.choices[0].message.content == "The send_email tool returned: sent, id 42"

        sheet = await chat(client, "Add 'milk' to the spreadsheet", tools=[EMAIL_TOOL, SHEET_TOOL])
        sheet_call: Any = (sheet.choices[0].message.tool_calls or [None])[0]
        assert sheet_call.function.name == "add_spreadsheet_row"
        plain = await chat(client, "What time is it?", tools=[EMAIL_TOOL, SHEET_TOOL])
        assert plain.choices[0].message.content == "You said: What time is it?"

        streamed = await chat(client, "email a@b.co", tools=[EMAIL_TOOL], stream=True)
        deltas = [c.choices[0] async for c in streamed]
        calls = [t for d in deltas for t in d.delta.tool_calls or []]
        assert calls[0].function is not None
        assert calls[0].function.name == "send_email"
        arguments = "".join(t.function.arguments or "" for t in calls if t.function)
        assert json.loads(arguments)["to"] == "a@b.co"
        assert deltas[-1].finish_reason == "tool_calls"


async def test_responses_api_text_tools_and_streaming() -> None:
    """The Responses API answers text, function calls and a stream the SDK parses."""
    tool: Any = {"type": "function", "name": "send_email", "parameters": EMAIL_PARAMETERS}
    async with serve(FakeOpenAIConfig()) as run, run.client() as client:
        response = await client.responses.create(
            model=MODEL, input="Summarise the news", instructions="Be brief."
        )
        assert response.object == "response"
        assert response.status == "completed"
        assert response.output_text == "You said: Summarise the news"
        assert response.usage is not None
        assert response.usage.input_tokens == prompt_tokens("Be brief.", "Summarise the news")
        assert response.usage.total_tokens == (
            response.usage.input_tokens + response.usage.output_tokens
        )

        called = await client.responses.create(
            model=MODEL, input="email carol@example.com", tools=[tool]
        )
        item = called.output[0]
        assert item.type == "function_call"
        assert item.name == "send_email"
        assert json.loads(item.arguments)["to"] == "carol@example.com"
        history: list[Any] = [
            {"role": "user", "content": "email carol@example.com"},
            item.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": item.call_id, "output": "queued"},
        ]
        answered = await client.responses.create(
            model=MODEL,
            input=history,
            tools=[tool],
        )
        assert answered.output_text == "The send_email tool returned: queued"

        events = [e async for e in await client.responses.create(
            model=MODEL, input="stream it", stream=True
        )]  # fmt: skip
        assert events[0].type == "response.created"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text == "You said: stream it"
        assert events[-1].type == "response.completed"
        assert events[-1].response.output_text == text


async def test_embeddings_and_models() -> None:
    """Embeddings are deterministic (base64 and float), and the models list parses."""
    async with serve(FakeOpenAIConfig()) as run, run.client() as client:
        result = await client.embeddings.create(
            model="text-embedding-3-small", input=["alpha", "beta", "alpha"]
        )
        vectors = [d.embedding for d in result.data]
        assert vectors[0] == vectors[2]
        assert vectors[0] != vectors[1]
        assert vectors[0] == pytest.approx(embed("alpha", 16), abs=1e-6)  # float32 via base64
        assert result.usage.prompt_tokens == 2 + 1 + 2  # ~4 characters a token, at least 1

        floats = await client.embeddings.create(
            model="text-embedding-3-small", input="alpha", encoding_format="float", dimensions=8
        )
        assert floats.data[0].embedding == embed("alpha", 8)

        models = [m.id async for m in client.models.list()]
        assert MODEL in models
        assert (await client.models.retrieve(MODEL)).owned_by == "system"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-nonexistent")


async def test_wrong_or_missing_key_is_401_invalid_api_key() -> None:
    """A wrong key raises AuthenticationError with code invalid_api_key and never shows the key."""
    wrong = "sk-wrong-key-0123456789abcdef"
    async with serve(FakeOpenAIConfig()) as run, run.client(wrong) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await chat(client)
        assert caught.value.code == "invalid_api_key"
        body = caught.value.body
        assert isinstance(body, dict)
        assert body["type"] == "invalid_request_error"
        assert body["param"] is None
        assert body["message"].startswith("Incorrect API key provided: sk-w")
        assert wrong not in body["message"]

        async with httpx2.AsyncClient() as http:
            missing = await http.post(f"{run.url}/v1/chat/completions", json={})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"

        record = await run.record()
        assert (record["unauthorized"], record["admitted"], record["requests_total"]) == (2, 0, 2)


async def test_max_in_flight_excess_is_429_with_headers() -> None:
    """Beyond max_in_flight the SDK raises RateLimitError with retry-after and x-ratelimit-*."""
    config = FakeOpenAIConfig(max_in_flight=2, rpm=100, tpm=100_000, latency=0.3)
    async with serve(config) as run, run.client() as client:
        results = await asyncio.gather(*(chat(client) for _ in range(4)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 2
        for error in errors:
            assert isinstance(error, openai.RateLimitError)
            assert error.code == "rate_limit_exceeded"
            assert error.type == "requests"
            headers = error.response.headers
            assert headers["retry-after"] == "1"
            assert headers["retry-after-ms"] == "1000"
            assert headers["x-ratelimit-limit-requests"] == "100"
            assert headers["x-ratelimit-remaining-requests"] == "98"
            assert headers["x-ratelimit-reset-requests"].endswith("s")
            assert headers["x-ratelimit-limit-tokens"] == "100000"
            assert int(headers["x-ratelimit-remaining-tokens"]) < 100_000
            assert "x-ratelimit-reset-tokens" in headers

        record = await run.record()
        assert record["max_in_flight"] == 2
        assert record["admitted"] == 2
        assert record["completed"] == 2
        assert record["rejected"]["concurrency"] == 2
        assert record["rejected_total"] == 2
        assert record["in_flight"] == 0


async def test_rpm_window_refuses_until_the_oldest_leaves() -> None:
    """Over rpm in a rolling window is 429 `requests`; retry-after-ms is the exact wait."""
    config = FakeOpenAIConfig(rpm=3, window_seconds=1.0)
    async with serve(config) as run, run.client() as client:
        for _ in range(3):
            await chat(client)
        with pytest.raises(openai.RateLimitError) as caught:
            await chat(client)
        error = caught.value
        assert error.type == "requests"
        assert "on requests per min (RPM): Limit 3, Used 3" in error.message
        headers = error.response.headers
        wait_ms = int(headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000
        assert headers["retry-after"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"

        record = await run.record()
        first = record["arrivals"][0]
        assert wait_ms / 1000 == pytest.approx(first + 1.0 - record["rejections"][0]["t"], abs=2e-3)

        await asyncio.sleep(wait_ms / 1000 + 0.01)
        await chat(client)
        record = await run.record()
        assert record["admitted"] == 4
        assert record["max_requests_in_window"] == 3
        assert record["rejected"]["requests"] == 1


async def test_tpm_charges_the_cap_then_corrects_and_refuses_too_large() -> None:
    """Tokens are charged at the cap, corrected to usage, and over-TPM asks are 429 `tokens`."""
    config = FakeOpenAIConfig(tpm=250, window_seconds=2.0)
    async with serve(config) as run, run.client() as client:
        used = 0
        for _ in range(3):  # 3 x 100 would exceed 250 without the correction
            done = await chat(client, max_tokens=100)
            assert done.usage is not None
            used += done.usage.total_tokens
        with pytest.raises(openai.RateLimitError) as caught:
            await chat(client, max_tokens=250 - used + 1)
        assert caught.value.type == "tokens"
        assert caught.value.code == "rate_limit_exceeded"
        assert 0 < int(caught.value.response.headers["retry-after-ms"]) <= 2000

        with pytest.raises(openai.RateLimitError) as too_large:
            await chat(client, max_tokens=300)
        assert too_large.value.message.startswith(
            "Error code: 429 - Request too large for gpt-4o-mini on tokens per min (TPM): "
            "Limit 250, Requested 300."
        )
        assert too_large.value.type == "tokens"

        record = await run.record()
        assert record["tokens_charged"] == 300
        assert record["tokens_used"] == used
        assert record["max_tokens_in_window"] == used
        assert record["max_charged_tokens_in_window"] == 300
        assert record["rejected"]["tokens"] == 1
        assert record["rejected"]["request_too_large"] == 1


async def test_a_stream_holds_its_slot_until_its_last_chunk() -> None:
    """With max_in_flight=1 a second request is refused while a stream is still sending."""
    config = FakeOpenAIConfig(max_in_flight=1, chunk_latency=0.03, stream_chunk_chars=4)
    async with serve(config) as run, run.client() as client:
        stream = await chat(client, "a slow streamed answer", stream=True)
        pieces = []
        async for chunk in stream:
            pieces.append(chunk)
            if len(pieces) == 2:
                with pytest.raises(openai.RateLimitError):
                    await chat(client, "refused while streaming")
        async with asyncio.timeout(2):
            while True:  # the client saw [DONE]; the server releases just after its last send
                if (await run.record())["in_flight"] == 0:
                    break
                await asyncio.sleep(0.005)
        await chat(client, "admitted after the stream")

        record = await run.record()
        stream_adm = record["admissions"][0]
        assert stream_adm["done"] - stream_adm["t"] >= (len(pieces) - 1) * 0.03
        assert (record["admitted"], record["max_in_flight"]) == (2, 1)
        assert record["rejected"]["concurrency"] == 1


async def test_insufficient_quota_once_spent() -> None:
    """After `quota` admitted requests every request is 429 insufficient_quota, not retryable."""
    async with serve(FakeOpenAIConfig(quota=2, rpm=100)) as run, run.client() as client:
        await chat(client)
        await client.embeddings.create(model="text-embedding-3-small", input="x")
        with pytest.raises(openai.RateLimitError) as caught:
            await chat(client)
        assert caught.value.code == "insufficient_quota"
        assert caught.value.type == "insufficient_quota"
        assert caught.value.message.endswith("api-errors.")
        assert "retry-after" not in caught.value.response.headers
        assert "x-ratelimit-limit-requests" in caught.value.response.headers
        record = await run.record()
        assert record["rejected"]["insufficient_quota"] == 1
        assert record["admitted"] == 2


async def test_record_has_exact_max_in_flight_and_max_per_window() -> None:
    """For a known load the record's max in flight and max per rolling window are exact."""
    config = FakeOpenAIConfig(window_seconds=0.5, latency=0.1)
    async with serve(config) as run, run.client() as client:
        await asyncio.gather(*(chat(client, "same") for _ in range(5)))
        await asyncio.sleep(0.5)  # the burst (answered 0.1 s after it came) leaves the window
        for _ in range(3):
            await chat(client, "same")
        record = await run.record()

    assert record["admitted"] == 5 + 3
    assert record["max_in_flight"] == 5
    assert record["max_requests_in_window"] == 5
    arrivals = record["arrivals"]
    assert arrivals == sorted(arrivals)
    brute = max(sum(1 for s in arrivals if t - 0.5 < s <= t) for t in arrivals)
    assert brute == 5
    tokens = {a["tokens"] for a in record["admissions"]}
    assert len(tokens) == 1
    assert record["max_tokens_in_window"] == 5 * tokens.pop()
    assert record["by_endpoint"] == {
        "/v1/chat/completions": 8,
        "/v1/responses": 0,
        "/v1/embeddings": 0,
    }
    assert record["by_key"]["sk-f**********-key"]["max_in_flight"] == 5


def test_max_in_window_and_go_duration_are_exact() -> None:
    """The sliding-window maximum counts (t - W, t] exactly, and durations print like Go's."""
    times = [0.0, 0.1, 0.5, 1.0, 1.05, 1.4]
    assert max_in_window(times, 1.0) == 4
    assert max_in_window([0.0, 1.0], 1.0) == 1  # exactly one window apart: never together
    assert max_in_window([1.0, 0.0, 0.999], 1.0) == 2  # unsorted input
    assert max_in_window(times, 1.0, [5, 1, 1, 1, 1, 1]) == 7
    assert max_in_window([], 1.0) == 0
    assert [go_duration(s) for s in (0, 0.02, 1, 1.5, 360, 52151.04)] == [
        "0s",
        "20ms",
        "1s",
        "1.5s",
        "6m0s",
        "14h29m11.04s",
    ]


async def test_admin_config_and_reset() -> None:
    """Limits change at runtime through /admin/config, and /admin/reset clears the windows."""
    async with serve(FakeOpenAIConfig()) as run, run.client() as client:
        status, config = await run.admin("POST", "/admin/config", {"rpm": 1})
        assert status == 200
        assert config["rpm"] == 1
        assert config["api_keys"] == ["sk-f**********-key"]
        await chat(client)
        with pytest.raises(openai.RateLimitError):
            await chat(client)
        for bad in ({"scope": "key"}, {"rpm": "many"}, {"latency": -1}):
            status, body = await run.admin("POST", "/admin/config", bad)
            assert status == 400, bad
            assert body["error"]["type"] == "invalid_request_error"

        status, _ = await run.admin("POST", "/admin/reset")
        assert status == 200
        record = await run.record()
        assert (record["admitted"], record["rejected_total"], record["arrivals"]) == (0, 0, [])
        await chat(client)
        assert (await run.record())["admitted"] == 1


async def test_per_key_scope_limits_each_key_separately() -> None:
    """With scope="key" each API key has its own max_in_flight."""
    config = FakeOpenAIConfig(
        api_keys=("sk-key-aaaaaaaaaaaa-1111", "sk-key-bbbbbbbbbbbb-2222"),
        scope="key",
        max_in_flight=1,
        latency=0.2,
    )
    async with (
        serve(config) as run,
        run.client("sk-key-aaaaaaaaaaaa-1111") as a,
        run.client("sk-key-bbbbbbbbbbbb-2222") as b,
    ):
        results = await asyncio.gather(chat(a), chat(b), chat(a), return_exceptions=True)
        assert [isinstance(r, openai.RateLimitError) for r in results] == [False, False, True]
        record = await run.record()
    assert record["max_in_flight"] == 2
    per_key = record["by_key"]
    assert per_key["sk-k****************1111"]["max_in_flight"] == 1
    assert per_key["sk-k****************1111"]["rejected"]["concurrency"] == 1
    assert per_key["sk-k****************2222"]["admitted"] == 1


async def test_cli_announces_its_address_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    """The CLI prints its URL once listening, serves, and exits 0 on SIGTERM."""
    record_file = tmp_path / "record.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "chatbot.fakes.openai_server",
        "--port",
        "0",
        "--rpm",
        "10",
        "--api-key",
        "sk-cli-key-123456789",
        "--record-file",
        str(record_file),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(15):
            assert proc.stdout is not None
            line = (await proc.stdout.readline()).decode().strip()
        assert line.startswith("fake-openai listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        async with openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="sk-cli-key-123456789", max_retries=0
        ) as client:
            reply = await chat(client, "from the CLI")
        assert reply.choices[0].message.content == "You said: from the CLI"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert "fake-openai stopped" in out.decode()
    assert json.loads(record_file.read_text())["admitted"] == 1


async def test_an_abandoned_stream_frees_its_slot() -> None:
    """A client that closes a stream early frees its slot at once, not when the stream would end."""
    config = FakeOpenAIConfig(max_in_flight=1, chunk_latency=0.05, stream_chunk_chars=1)
    async with serve(config) as run, run.client() as client:
        stream = await chat(client, "x" * 200, stream=True)  # ~210 chunks: over 10 s in full
        async for _ in stream:
            break
        await stream.close()
        async with asyncio.timeout(1):
            while True:  # the server sees the disconnect on its side of the socket
                if (await run.record())["in_flight"] == 0:
                    break
                await asyncio.sleep(0.005)
        await chat(client, "admitted")
        record = await run.record()
    assert (record["admitted"], record["completed"], record["rejected_total"]) == (2, 2, 0)
