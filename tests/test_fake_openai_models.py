"""The fake OpenAI's per-model and per-key limits, their headers and their record.

Like the real API (which limits each organization per model), the fake can limit each
model (``model_limits``: per key and model with scope "key", per model across keys with
scope "global") and give single keys their own limits (``key_limits``, a tier that may
change at runtime). These tests call the app in-process through httpx's ASGI transport:
a response returns once the app is done with it, its slot freed and its tokens corrected,
so every count below is exact without waiting. Embeddings are charged exactly their usage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from chatbot.fakes.openai_server import DEFAULT_API_KEY, FakeOpenAIConfig, create_app, mask_key
from chatbot.fakes.openai_server._app import _config_from_args, _parse_args, main

KEY_A = "sk-key-aaaaaaaaaaaa-1111"
KEY_B = "sk-key-bbbbbbbbbbbb-2222"
A, B = mask_key(KEY_A), mask_key(KEY_B)
BIG, SMALL = "gpt-4o", "gpt-4o-mini"
NO_REJECTIONS = {
    "concurrency": 0,
    "requests": 0,
    "tokens": 0,
    "request_too_large": 0,
    "insufficient_quota": 0,
}


@contextlib.asynccontextmanager
async def fake_api(config: FakeOpenAIConfig) -> AsyncIterator[httpx2.AsyncClient]:
    """A client of a new fake, called in-process (each response complete when returned)."""
    transport = httpx2.ASGITransport(app=create_app(config))
    async with httpx2.AsyncClient(transport=transport, base_url="http://fake-openai") as http:
        yield http


async def get_record(http: httpx2.AsyncClient) -> dict[str, Any]:
    response = await http.get("/admin/record")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


async def configure(http: httpx2.AsyncClient, changes: Any) -> tuple[int, Any]:
    response = await http.post("/admin/config", json=changes)
    return response.status_code, response.json()


def rejected(**counts: int) -> dict[str, int]:
    return {**NO_REJECTIONS, **counts}


async def call(
    http: httpx2.AsyncClient,
    model: str,
    key: str = DEFAULT_API_KEY,
    endpoint: str = "/v1/embeddings",
    tokens: int = 1,
    **extra: Any,
) -> httpx2.Response:
    """One request for ``model``; an embedding is charged exactly ``tokens`` tokens."""
    body: dict[str, Any] = {"model": model, **extra}
    if endpoint == "/v1/embeddings":
        body["input"] = "x" * (4 * tokens)
    elif endpoint == "/v1/responses":
        body["input"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    return await http.post(endpoint, json=body, headers={"authorization": f"Bearer {key}"})


def limits(response: httpx2.Response) -> tuple[str | None, ...]:
    """The response's limit and remaining headers, requests then tokens."""
    return tuple(
        response.headers.get(f"x-ratelimit-{what}")
        for what in ("limit-requests", "remaining-requests", "limit-tokens", "remaining-tokens")
    )


def rpm_message(model: str, limit: int, used: int) -> str:
    return (
        f"Rate limit reached for {model} in organization org-fake on requests per min (RPM): "
        f"Limit {limit}, Used {used}, Requested 1. Please try again in "
    )


async def test_a_model_at_its_limit_is_429_while_another_model_still_serves() -> None:
    """With scope "global" a model's bucket is shared by every key and every endpoint."""
    config = FakeOpenAIConfig(api_keys=(KEY_A, KEY_B), model_limits={BIG: {"rpm": 3}})
    async with fake_api(config) as http:
        assert (await call(http, BIG, KEY_A, "/v1/chat/completions")).status_code == 200
        assert (await call(http, BIG, KEY_B, "/v1/responses")).status_code == 200
        assert (await call(http, BIG, KEY_A)).status_code == 200
        refused = await call(http, BIG, KEY_B, "/v1/chat/completions")
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert error["message"].startswith(rpm_message(BIG, 3, 3))
        assert limits(refused) == ("3", "0", None, None)
        assert 0 < int(refused.headers["retry-after-ms"]) <= 60_000

        for key in (KEY_A, KEY_B):  # the other model has no limits: no headers either
            served = await call(http, SMALL, key, "/v1/chat/completions")
            assert served.status_code == 200
            assert limits(served) == (None, None, None, None)
        record = await get_record(http)
    rejection = record["rejections"][0]
    assert {k: rejection[k] for k in ("reason", "key", "model", "bucket")} == {
        "reason": "requests",
        "key": B,
        "model": BIG,
        "bucket": "model",
    }
    assert record["by_model"][BIG]["admitted"] == 3
    assert record["by_model"][BIG]["rejected"] == rejected(requests=1)
    assert record["by_model"][SMALL]["admitted"] == 2
    assert record["by_endpoint"] == {
        "/v1/chat/completions": 3,
        "/v1/responses": 1,
        "/v1/embeddings": 1,
    }


async def test_with_scope_key_each_key_and_model_has_its_own_bucket() -> None:
    """2 keys x 2 models, each pair its own rpm; exhausting one pair touches no other."""
    config = FakeOpenAIConfig(
        api_keys=(KEY_A, KEY_B),
        scope="key",
        model_limits={BIG: {"rpm": 2}, SMALL: {"rpm": 3}},
    )
    async with fake_api(config) as http:
        statuses = [(await call(http, BIG, KEY_A)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        statuses = [(await call(http, SMALL, KEY_A)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        # Key B's buckets saw none of key A's requests.
        first = await call(http, BIG, KEY_B)
        assert limits(first)[:2] == ("2", "1")
        assert (await call(http, BIG, KEY_B)).status_code == 200
        assert (await call(http, SMALL, KEY_B)).status_code == 200
        record = await get_record(http)
    assert [(r["key"], r["model"], r["bucket"]) for r in record["rejections"]] == [
        (A, BIG, "model"),
        (A, SMALL, "model"),
    ]
    assert {name: stats["admitted"] for name, stats in record["by_key_model"].items()} == {
        f"{A}|{BIG}": 2,
        f"{A}|{SMALL}": 3,
        f"{B}|{BIG}": 2,
        f"{B}|{SMALL}": 1,
    }


async def test_headers_report_the_models_limits_and_remaining() -> None:
    """A model's own rpm and tpm are in its headers; a limit it lacks falls back to the key's."""
    config = FakeOpenAIConfig(
        rpm=100,
        tpm=10_000,
        model_limits={BIG: {"rpm": 5, "tpm": 1000}, "text-embedding-3-small": {"rpm": 7}},
    )
    async with fake_api(config) as http:
        first = await call(http, BIG, tokens=10)
        assert limits(first) == ("5", "4", "1000", "990")
        assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert first.headers["x-ratelimit-reset-tokens"] == "1m0s"
        assert limits(await call(http, BIG, tokens=20)) == ("5", "3", "1000", "970")
        # No model limits: the global bucket, which counted the requests above too.
        assert limits(await call(http, SMALL, tokens=30)) == ("100", "97", "10000", "9940")
        # Only an rpm of its own: its requests headers, the global tokens headers.
        own_rpm = await call(http, "text-embedding-3-small", tokens=40)
        assert limits(own_rpm) == ("7", "6", "10000", "9900")

        over = await call(http, BIG, tokens=971)
        assert over.status_code == 429
        error = over.json()["error"]
        assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
        assert error["message"].startswith(
            f"Rate limit reached for {BIG} in organization org-fake on tokens per min (TPM): "
            "Limit 1000, Used 30, Requested 971. Please try again in "
        )
        assert limits(over) == ("5", "3", "1000", "970")
        too_large = (await call(http, BIG, tokens=1001)).json()["error"]
        assert too_large["message"].startswith(
            f"Request too large for {BIG} on tokens per min (TPM): Limit 1000, Requested 1001."
        )
        record = await get_record(http)
    assert [(r["reason"], r["bucket"]) for r in record["rejections"]] == [
        ("tokens", "model"),
        ("request_too_large", "model"),
    ]


async def test_a_model_bucket_corrects_a_charge_to_its_usage() -> None:
    """A chat is charged its cap in both its buckets, then corrected in both when answered."""
    config = FakeOpenAIConfig(tpm=10_000, model_limits={BIG: {"tpm": 1000}})
    async with fake_api(config) as http:
        first = await call(http, BIG, endpoint="/v1/chat/completions", max_tokens=50)
        assert limits(first)[2:] == ("1000", "950")
        used = first.json()["usage"]["total_tokens"]
        second = await call(http, BIG, endpoint="/v1/chat/completions", max_tokens=50)
        assert limits(second)[2:] == ("1000", str(1000 - used - 50))
        other = await call(http, SMALL, endpoint="/v1/chat/completions", max_tokens=50)
        assert limits(other)[2:] == ("10000", str(10_000 - 2 * used - 50))
        record = await get_record(http)
    assert record["in_flight"] == 0


async def test_a_request_leaving_one_window_first_is_corrected_in_the_other() -> None:
    """A request still in flight when its key's window drops it is corrected in its model's.

    The second request prunes the key's bucket while the first is in flight; the first is
    then corrected in its model's bucket only, which drops it later at its corrected usage.
    Both buckets end empty before the last two requests, whatever the timing.
    """
    chat = "/v1/chat/completions"
    config = FakeOpenAIConfig(
        tpm=1000, window_seconds=0.1, latency=0.3, model_limits={BIG: {"tpm": 500}}
    )
    async with fake_api(config) as http:

        async def while_the_first_is_in_flight() -> httpx2.Response:
            await asyncio.sleep(0.15)
            return await call(http, SMALL, endpoint=chat, max_tokens=50)

        await asyncio.gather(
            call(http, BIG, endpoint=chat, max_tokens=50), while_the_first_is_in_flight()
        )
        assert limits(await call(http, BIG, endpoint=chat, max_tokens=50))[2:] == ("500", "450")
        assert limits(await call(http, SMALL, endpoint=chat, max_tokens=50))[2:] == ("1000", "950")


async def test_a_runtime_tier_change_applies_to_the_next_request() -> None:
    """Lowering one key's rpm through /admin/config refuses its next request; headers follow."""
    config = FakeOpenAIConfig(api_keys=(KEY_A, KEY_B), scope="key", rpm=10)
    async with fake_api(config) as http:
        for _ in range(3):
            served = await call(http, SMALL, KEY_A)
        assert limits(served)[:2] == ("10", "7")

        status, body = await configure(http, {"key_limits": {KEY_A: {"rpm": 4}}})
        assert status == 200
        assert body["key_limits"] == {A: {"rpm": 4}}
        assert limits(await call(http, SMALL, KEY_A))[:2] == ("4", "0")
        refused = await call(http, SMALL, KEY_A)
        assert refused.status_code == 429
        assert refused.json()["error"]["message"].startswith(rpm_message(SMALL, 4, 4))
        assert limits(refused)[:2] == ("4", "0")
        assert limits(await call(http, SMALL, KEY_B))[:2] == ("10", "9")  # B keeps the default

        status, _ = await configure(http, {"key_limits": {KEY_A: {"rpm": 2}}})
        assert status == 200
        refused = await call(http, SMALL, KEY_A)
        assert refused.json()["error"]["message"].startswith(rpm_message(SMALL, 2, 4))
        assert limits(refused)[:2] == ("2", "0")

        # A model limit set at runtime counts the requests made before it.
        status, body = await configure(http, {"model_limits": {SMALL: {"rpm": 2}}})
        assert (status, body["model_limits"]) == (200, {SMALL: {"rpm": 2}})
        assert body["key_limits"] == {A: {"rpm": 2}}  # a table left out is kept
        assert limits(await call(http, SMALL, KEY_B))[:2] == ("2", "0")
        refused = await call(http, SMALL, KEY_B)
        assert refused.json()["error"]["message"].startswith(rpm_message(SMALL, 2, 2))

        status, _ = await configure(http, {"key_limits": {}})
        assert status == 200
        assert (await call(http, "gpt-4.1-mini", KEY_A)).status_code == 200  # back to rpm 10
        record = await get_record(http)
    assert [(r["key"], r["bucket"]) for r in record["rejections"]] == [
        (A, "key"),
        (A, "key"),
        (B, "model"),
    ]
    assert record["limits"]["key_limits"] == {}
    assert record["limits"]["model_limits"] == {SMALL: {"rpm": 2}}


async def test_the_record_counts_by_model_and_by_key_and_model_exactly() -> None:
    """by_model and by_key_model have each pair's admissions, window maxima and rejections."""
    config = FakeOpenAIConfig(
        api_keys=(KEY_A, KEY_B), scope="key", model_limits={BIG: {"rpm": 2, "tpm": 100}}
    )
    async with fake_api(config) as http:
        assert [(await call(http, m, k, tokens=t)).status_code for m, k, t in [
            (BIG, KEY_A, 10), (BIG, KEY_A, 20), (BIG, KEY_A, 5),  # the 3rd is over the rpm
            (BIG, KEY_B, 60), (BIG, KEY_B, 41),  # the 2nd is over the tpm
            (SMALL, KEY_A, 7), (SMALL, KEY_B, 1), (SMALL, KEY_B, 2),
        ]] == [200, 200, 429, 200, 429, 200, 200, 200]  # fmt: skip
        record = await get_record(http)

    def counts(admitted: int, in_window: int, **refused: int) -> dict[str, Any]:
        return {
            "admitted": admitted,
            "max_requests_in_window": admitted,  # all within one 60 s window
            "max_tokens_in_window": in_window,
            "rejected": rejected(**refused),
        }

    assert record["by_model"] == {
        BIG: counts(3, 90, requests=1, tokens=1),
        SMALL: counts(3, 10),
    }
    assert record["by_key_model"] == {
        f"{A}|{BIG}": counts(2, 30, requests=1),
        f"{B}|{BIG}": counts(1, 60, tokens=1),
        f"{A}|{SMALL}": counts(1, 7),
        f"{B}|{SMALL}": counts(2, 3),
    }
    assert record["by_key"][A]["admitted"] == 3
    assert record["by_key"][A]["rejected"] == rejected(requests=1)
    assert [(a["key"], a["model"], a["tokens"]) for a in record["admissions"]] == [
        (A, BIG, 10),
        (A, BIG, 20),
        (B, BIG, 60),
        (A, SMALL, 7),
        (B, SMALL, 1),
        (B, SMALL, 2),
    ]
    assert (record["admitted"], record["rejected_total"]) == (6, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"model_limits": [BIG]},
            "model_limits must be an object of a model name -> {rpm, tpm}, got list",
        ),
        (
            {"model_limits": {BIG: 5}},
            "model_limits must be an object of a model name -> {rpm, tpm}: "
            "model_limits['gpt-4o'] is int, not an object",
        ),
        (
            {"model_limits": {BIG: {"rpm": 5, "rph": 1}}},
            "model_limits['gpt-4o'] has unknown field(s) ['rph']; allowed: ['rpm', 'tpm']",
        ),
        (
            {"model_limits": {BIG: {"max_in_flight": 1}}},
            "model_limits['gpt-4o'] has unknown field(s) ['max_in_flight']; "
            "allowed: ['rpm', 'tpm']",
        ),
        (
            {"model_limits": {BIG: {"tpm": "100"}}},
            "model_limits['gpt-4o'].tpm must be an integer >= 0 or null, got '100'",
        ),
        (
            {"key_limits": {KEY_A: {"rpm": -1}}},
            f"key_limits[{A!r}].rpm must be an integer >= 0 or null, got -1",
        ),
        (
            {"key_limits": {KEY_A: {"max_in_flight": True}}},
            f"key_limits[{A!r}].max_in_flight must be an integer >= 0 or null, got True",
        ),
    ],
)
async def test_a_bad_runtime_limit_table_is_400_naming_the_field(
    change: dict[str, Any], message: str
) -> None:
    """A malformed table is refused whole with a message naming the entry and the field."""
    config = FakeOpenAIConfig(api_keys=(KEY_A,), scope="key", model_limits={BIG: {"rpm": 9}})
    async with fake_api(config) as http:
        status, body = await configure(http, change)
        assert status == 400
        assert body["error"] == {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        assert KEY_A not in body["error"]["message"]  # a key is masked, as everywhere
        now = (await http.get("/admin/config")).json()
        assert (now["model_limits"], now["key_limits"]) == ({BIG: {"rpm": 9}}, {})  # unchanged


async def test_key_limits_need_scope_key() -> None:
    """With scope "global" keys share one bucket: key_limits there is an error, not a no-op."""
    with pytest.raises(ValueError, match=r"^key_limits needs scope 'key'"):
        FakeOpenAIConfig(key_limits={KEY_A: {"rpm": 1}})
    with pytest.raises(ValueError, match=r"^model_limits\['gpt-4o'\]\.rpm must be an integer"):
        FakeOpenAIConfig(model_limits={BIG: {"rpm": 1.5}})  # type: ignore[dict-item]
    async with fake_api(FakeOpenAIConfig()) as http:
        status, body = await configure(http, {"key_limits": {KEY_A: {}}})
    assert status == 400
    assert body["error"]["message"].startswith("key_limits needs scope 'key'")


def test_cli_limit_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """--model-limit and --key-limit take NAME=RPM[:TPM], repeatable; a bad one says so."""
    args = _parse_args(
        [
            "--port", "0", "--scope", "key",
            "--model-limit", "gpt-4o=30:20000", "--model-limit", "ft:gpt-4o:acme=5",
            "--key-limit", f"{KEY_A}=3", "--key-limit", f"{KEY_B}=6:900",
        ]
    )  # fmt: skip
    config = _config_from_args(args)
    assert config.model_limits == {
        "gpt-4o": {"rpm": 30, "tpm": 20000},
        "ft:gpt-4o:acme": {"rpm": 5},
    }
    assert config.key_limits == {KEY_A: {"rpm": 3}, KEY_B: {"rpm": 6, "tpm": 900}}

    for bad in ("gpt-4o", "gpt-4o=", "=5", "gpt-4o=5:", "gpt-4o=five"):
        with pytest.raises(SystemExit, match=r"^--model-limit wants NAME=RPM\[:TPM\], got "):
            _config_from_args(_parse_args(["--port", "0", "--model-limit", bad]))
    assert main(["--port", "0", "--key-limit", f"{KEY_A}=3"]) == 2  # scope "global"
    assert "fake-openai: key_limits needs scope 'key'" in capsys.readouterr().err
