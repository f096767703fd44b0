"""Redis clients made from a URL, with the limiter's fail-fast connection settings.

Schemes: ``redis://``, ``rediss://`` and ``unix://`` (redis-py's own URL format),
``redis+cluster://`` / ``rediss+cluster://`` for a Redis Cluster (see ``_cluster_client``),
and ``redis+sentinel://`` for a master found through Redis Sentinel::

    redis+sentinel://[[username]:password@]host:port[,host:port...]/service_name[/db]
        [?sentinel_username=...&sentinel_password=...]

The hosts are the sentinels (port 26379 when left out; IPv6 as ``[::1]:26379``). The
username and password before ``@`` are the master's (Redis ``AUTH``); percent-encode
reserved characters in them. ``sentinel_username`` / ``sentinel_password`` authenticate
to the sentinels themselves when they have ``requirepass`` set. TLS through Sentinel
(``rediss+sentinel://``) is not supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._errors import ConfigError

__all__ = ["SentinelURL", "client_from_url", "parse_sentinel_url", "redact_url"]

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Query arguments a cluster URL passes on to its connections as they are (TLS settings).
_CLUSTER_QUERY_KEYS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_ca_path",
)
DEFAULT_SENTINEL_PORT = 26379
#: Schemes redis-py's own URL parser takes.
_PLAIN_SCHEMES = ("redis", "rediss", "unix")
#: Every scheme client_from_url takes, as its errors list them.
_KNOWN = (
    "the limiter takes redis://, rediss://, unix://, redis+cluster://, rediss+cluster:// "
    "and redis+sentinel://"
)
_QUERY_KEYS = ("sentinel_password", "sentinel_username")


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``redis+sentinel://`` URL (the passwords are kept out of the repr)."""

    #: ``(host, port)`` of every sentinel, in the URL's order.
    sentinels: tuple[tuple[str, int], ...]
    #: The name the sentinels monitor the master under (``sentinel monitor <name> ...``).
    service_name: str
    #: Database number on the master.
    db: int = 0
    #: The master's ``AUTH`` username and password.
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: ``AUTH`` for the sentinels themselves.
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***`` (for error messages).

    Every query value is masked too: a misspelt key may carry a password.
    """
    masked = re.sub(r"([?&][^=&]*=)[^&]*", r"\1***", url)
    scheme, sep, rest = masked.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return masked
    # Everything before the last "@" may hold a password: a password containing "@" or
    # "/" then stays hidden whole, at the price of hiding the username too.
    return f"{scheme}://***@{rest[at + 1 :]}"


def _bad(url: str, problem: str) -> ConfigError:
    return ConfigError(f"url: {problem} (in {redact_url(url)})", field="url", value=redact_url(url))


def _parse_host(
    url: str,
    item: str,
    index: int,
    *,
    what: str = "sentinel",
    default_port: int = DEFAULT_SENTINEL_PORT,
) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise _bad(url, f"{what} {index}: {item!r} is not [address]:port")
        port_text = tail[1:] if tail else ""
    elif item.count(":") > 1:
        raise _bad(
            url, f"{what} {index}: write IPv6 addresses in brackets, as [::1]:{default_port}"
        )
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _bad(url, f"{what} {index}: no host in {item!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"{what} {index}: port {port_text!r} is not a number in 1-65535")
    return host, int(port_text)


def _split(rest: str) -> tuple[str | None, str | None, str, str, str]:
    """``user:password@host:port,...[/path][?query]`` (after ``scheme://``) in parts:
    username, password (percent-decoded), hosts, path, query."""
    main, _, query = rest.partition("?")
    netloc, _, path = main.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        username = unquote(user_text) or None
        password = unquote(password_text) if colon else None
    return username, password, hosts, path, query


def parse_sentinel_url(url: str) -> SentinelURL:
    """Parse a ``redis+sentinel://`` URL; :class:`ConfigError` (``field="url"``) if invalid."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise _bad(url, f"the scheme must be {SENTINEL_SCHEME}://")
    username, password, hosts, path, query = _split(rest)
    if not hosts:
        raise _bad(url, "no sentinel host:port before the service name")
    sentinels = tuple(
        _parse_host(url, item.strip(), i) for i, item in enumerate(hosts.split(","), start=1)
    )
    parts = path.split("/")
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise _bad(url, "no service name: write host:port/<service_name>[/<db>]")
    if len(parts) > 2:
        raise _bad(url, "the path must be /<service_name>[/<db>]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise _bad(url, f"database {parts[1]!r} is not a number >= 0")
        db = int(parts[1])
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad(url, "the query string is malformed") from None
    for key, value in pairs:
        if key not in _QUERY_KEYS:
            known = ", ".join(_QUERY_KEYS)
            raise _bad(url, f"unknown query argument {key!r} (known: {known})")
        if key in options:
            raise _bad(url, f"query argument {key!r} given twice")
        options[key] = value
    return SentinelURL(
        sentinels=sentinels,
        service_name=unquote(parts[0]),
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def client_from_url(
    url: str,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    max_connections: int,
    pool_timeout: float,
) -> Any:
    """A ``redis.asyncio`` client for ``url`` (see the module docstring for the schemes).

    The client uses a blocking pool of ``max_connections``: a burst of more concurrent
    calls queues for a connection (up to ``pool_timeout`` seconds) instead of failing.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in CLUSTER_SCHEMES:
        return _cluster_client(url, socket_timeout, socket_connect_timeout, max_connections)
    if scheme == SENTINEL_SCHEME:
        return _sentinel_client(
            parse_sentinel_url(url),
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            max_connections=max_connections,
            pool_timeout=pool_timeout,
        )
    if scheme.endswith("+sentinel"):
        raise _bad(url, f"{scheme}:// is not supported; use {SENTINEL_SCHEME}://")
    if "://" not in url:
        raise _bad(url, f"no scheme: write redis://host:port/db ({_KNOWN})")
    if scheme not in _PLAIN_SCHEMES:
        raise _bad(url, f"{scheme}:// is not a Redis URL ({_KNOWN})")
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
        )
    except ValueError as exc:  # redis-py's parser: a bad port, database or query value
        raise _bad(url, _scrub(str(exc), url)) from None
    return Redis.from_pool(pool)


def _scrub(message: str, url: str) -> str:
    """``message`` without the URL's password (as written and percent-decoded)."""
    userinfo = url.partition("://")[2].partition("?")[0].rpartition("@")[0]
    secret = userinfo.partition(":")[2]
    for s in {secret, unquote(secret)} - {""}:
        message = message.replace(s, "***")
    return message


def _sentinel_client(
    parsed: SentinelURL,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    max_connections: int,
    pool_timeout: float,
) -> Any:
    """The master's client, through a :class:`redis.asyncio.sentinel.Sentinel`.

    Every connection, to the master and to the sentinels, has the short socket timeouts:
    a dead master fails the call at once, and the next call asks the sentinels again, so
    it reaches the new master as soon as one is promoted. A sentinel that does not answer
    is skipped for the next one (no retries with backoff on a sentinel connection).
    """
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if parsed.sentinel_username is not None:
        sentinel_kwargs["username"] = parsed.sentinel_username
    if parsed.sentinel_password is not None:
        sentinel_kwargs["password"] = parsed.sentinel_password
    sentinel = _Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    client = sentinel.master_for(
        parsed.service_name,
        redis_class=_SentinelMasterRedis,
        connection_pool_class=_BlockingSentinelConnectionPool,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
    )
    client._limiter_sentinel = sentinel
    return client


class _Sentinel(Sentinel):
    """redis-py's ``Sentinel``, safe when many tasks look for the master at once.

    redis-py (8.1) moves the sentinel that answered to the front of its list with a swap
    by index taken before an ``await``: two concurrent look-ups (every task that finds the
    master gone does one) can then write one sentinel client twice and drop another
    from the list. The dropped sentinel is never asked again and never closed (its
    connections leak). Here the answering sentinel is moved by identity, with no
    ``await`` in between, and ``aclose`` closes every client made at the start.
    """

    def __init__(self, sentinels: list[tuple[str, int]], **kwargs: Any) -> None:
        super().__init__(sentinels, **kwargs)  # type: ignore[no-untyped-call]
        self._all_sentinels = tuple(self.sentinels)

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors = []
        for sentinel in tuple(self.sentinels):  # a snapshot: others may reorder the list
            try:
                masters: Any = await sentinel.sentinel_masters()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                errors.append(f"{sentinel} - {exc!r}")
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                if self.sentinels[0] is not sentinel:
                    rest = [s for s in self.sentinels if s is not sentinel]
                    self.sentinels[:] = [sentinel, *rest]
                ip = state["ip"] if self._force_master_ip is None else self._force_master_ip
                return ip, state["port"]
        detail = f" : {', '.join(errors)}" if errors else ""
        raise MasterNotFoundError(f"No master found for {service_name!r}{detail}")

    async def aclose(self) -> None:
        self.sentinels[:] = self._all_sentinels
        await super().aclose()


class _BlockingSentinelConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's sentinel pool, blocking like the plain URLs' pool: waits for a free connection."""


class _SentinelMasterRedis(Redis):
    """The master's client, found through the sentinels; ``aclose`` closes those clients too."""

    _limiter_sentinel: Any = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            sentinel, self._limiter_sentinel = self._limiter_sentinel, None
            if sentinel is not None:
                await sentinel.aclose()


def _cluster_client(
    url: str, socket_timeout: float, socket_connect_timeout: float, max_connections: int
) -> Any:
    """A ``redis.asyncio.RedisCluster`` for a ``redis+cluster://`` URL (see the README).

    ``redis+cluster://[[username]:password@]host:port[,host:port...][/0][?ssl_...=...]``,
    ``rediss+cluster://`` for TLS. Every host is a startup node: one that answers is
    enough, the client learns the rest of the cluster from it.
    """
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    scheme, _, rest = url.partition("://")
    username, password, hosts, path, query = _split(rest)
    if not hosts:
        raise _bad(url, "no startup node host:port")
    nodes = [
        ClusterNode(*_parse_host(url, item.strip(), i, what="startup node", default_port=6379))
        for i, item in enumerate(hosts.split(","), start=1)
    ]
    if path not in ("", "0"):
        raise _bad(url, f"database {path!r}: a Redis Cluster has only database 0")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _CLUSTER_QUERY_KEYS:
            known = ", ".join(_CLUSTER_QUERY_KEYS)
            raise _bad(url, f"unknown query argument {key!r} (known: {known})")
        options[key] = value
    return RedisCluster(
        startup_nodes=nodes,
        username=username,
        password=password,
        ssl=scheme.lower() == "rediss+cluster",
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        max_connections=max_connections,
        **options,
    )
