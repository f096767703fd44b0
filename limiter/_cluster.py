"""``redis+cluster://`` URLs: a ``redis.asyncio.RedisCluster`` with fail-fast settings.

The format follows the ``limits`` library's storage URLs::

    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?ssl_ca_certs=...]
    rediss+cluster://...   (TLS)

Every ``host:port`` is a startup node; one that answers is enough, the client learns
the rest of the cluster from it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from ._errors import ConfigError

__all__ = ["CLUSTER_SCHEMES", "cluster_client_from_url", "redact_url"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
#: Query arguments passed on to the connections as they are (all TLS settings).
_PASSED = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_ca_path")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    creds, at, tail = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.partition(":")[0]
    return f"{scheme}://{user}:***@{tail}"


def _bad(url: str, why: str) -> ConfigError:
    return ConfigError(f"url={redact_url(url)!r}: {why}", field="url", value=redact_url(url))


def cluster_client_from_url(
    url: str,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    max_connections: int,
) -> Any:
    """A ``redis.asyncio.RedisCluster`` for a ``redis+cluster://`` URL."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise _bad(url, f"the scheme must be one of {', '.join(CLUSTER_SCHEMES)}")
    creds, _, hosts = parts.netloc.rpartition("@")
    username = password = None
    if creds:
        user, colon, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise _bad(url, f"startup node {item!r} is not host:port")
        nodes.append(ClusterNode(host, int(port)))
    if parts.path not in ("", "/", "/0"):
        raise _bad(url, "a Redis Cluster has only database 0")
    extra: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _PASSED:
            raise _bad(url, f"unknown query argument {name!r} (known: {', '.join(_PASSED)})")
        extra[name] = value
    return RedisCluster(
        startup_nodes=nodes,
        username=username,
        password=password,
        ssl=parts.scheme == "rediss+cluster",
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        max_connections=max_connections,
        **extra,
    )
