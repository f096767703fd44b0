"""The script runner: the one way the limiter's Lua scripts reach Redis.

Owns: the Redis client handle as the scripts use it, each script's SHA (EVALSHA, loaded
again on NOSCRIPT), the one-time ``initialize()`` of a cluster client, the cluster
connection cap, and the mapping of Redis errors to :class:`LimiterUnavailable`. Called by
the admission, waiting, fail-open and registry parts; it calls none of them (a reload
after NOSCRIPT is reported through its ``on_reload`` callback).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._contract import OPERATIONS, KeyPlan, lua_source
from ._errors import LimiterUnavailable

__all__ = ["REDIS_ERRORS", "ScriptRunner", "is_outage", "redact"]

#: What a Redis client raises when Redis fails: redis-py's cluster client raises
#: RedisClusterException (not a RedisError) for a slot it cannot route, e.g. CROSSSLOT.
REDIS_ERRORS = (RedisError, RedisClusterException)

#: Redis errors that mean "unreachable for now" (fail_open admits locally); every other
#: error (a wrong password, a denied command, CROSSSLOT) is raised under both policies.
_OUTAGES = (RedisConnectionError, RedisTimeoutError, ClusterDownError, ReadOnlyError)
_NOT_OUTAGES = (AuthenticationError, AuthorizationError)

#: The connection cap of a client that needs none (standalone, Sentinel): does nothing.
_NO_CAP: contextlib.nullcontext[None] = contextlib.nullcontext()


def redact(exc: BaseException) -> str:
    """A Redis error as text for our messages (redis-py never puts passwords in them)."""
    return f"{type(exc).__name__}: {exc}"


def is_outage(exc: LimiterUnavailable) -> bool:
    """Whether ``exc`` says Redis is unreachable for now (not a mistake such as a denial)."""
    cause = exc.__cause__
    return isinstance(cause, _OUTAGES) and not isinstance(cause, _NOT_OUTAGES)


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str, sha: str) -> None:
        self.source = source
        self.sha = sha


class ScriptRunner:
    """Runs the scripts of ``limiter/_contract.py`` on one Redis client."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        #: A redis-py cluster client: no script pipelines, initialize() before use.
        self.cluster = type(redis).__name__ == "RedisCluster"
        #: Told when Redis had lost the scripts (a flush, a restart) and they were loaded
        #: again.
        self.on_reload: Callable[[], None] | None = None
        self._scripts: dict[str, _Script] = {}
        for name in OPERATIONS:
            script = redis.register_script(lua_source(name))
            self._scripts[name] = _Script(script.script, script.sha)
        self._ready = False
        # redis-py's cluster client fails a command (MaxConnectionsError) when a node's
        # connections are all busy, where the standalone blocking pool would queue it:
        # queue script calls here instead, leaving two connections for pub/sub.
        self.connection_cap: asyncio.Semaphore | contextlib.nullcontext[None] = _NO_CAP
        if self.cluster:
            per_node = getattr(redis, "nodes_manager", None)
            kwargs = getattr(per_node, "connection_kwargs", {}) or {}
            self.connection_cap = asyncio.Semaphore(
                max(1, int(kwargs.get("max_connections", 100)) - 2)
            )

    async def ready(self) -> bool:
        """Initialize a cluster client once; True on the first call (first contact)."""
        if self._ready:
            return False
        # redis-py's asyncio RedisCluster must be initialized before concurrent use.
        init = getattr(self.redis, "initialize", None)
        if init is not None and self.cluster:
            try:
                await init()
            except REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, "connect", redact(exc)) from exc
        self._ready = True
        return True

    async def run(
        self,
        op: str,
        plan: KeyPlan,
        *args: Any,
        tail: tuple[Any, ...] = (),
        retry_args: tuple[Any, ...] | None = None,
        label: str | None = None,
    ) -> Any:
        """Run per-API operation ``op`` for ``plan`` with its own ``args`` (as named).

        A connection found closed (a Redis restart, a dropped pooled connection) is tried
        once more on a fresh one, with ``retry_args`` when given: every script is written
        so that running it again after an unseen first run does no harm (acquire asks
        again as a waiter would, and finds its slot if the first run admitted it).
        """
        argv = plan.argv(op, *args, tail=tail)
        again = None if retry_args is None else plan.argv(op, *retry_args, tail=tail)
        return await self.call(op, plan.keys, argv, plan.api, label or op, again)

    async def call(
        self,
        op: str,
        keys: Sequence[bytes],
        args: Sequence[Any],
        api: str | None,
        label: str,
        retry_args: Sequence[Any] | None = None,
    ) -> Any:
        """EVALSHA script ``op``; LimiterUnavailable(api, label) when Redis fails."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            try:
                result = await self.eval(op, keys, args)
            except RedisConnectionError:
                result = await self.eval(op, keys, retry_args or args)
        except REDIS_ERRORS as exc:
            raise LimiterUnavailable(api, label, redact(exc)) from exc
        if task is not None and task.cancelling() > cancels:
            # redis-py (8.1, on Python 3.11) can swallow a cancellation that arrives while
            # a command is being sent; honour it here, so that the caller's cleanup runs.
            raise asyncio.CancelledError
        return result

    async def eval(self, op: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script again on NOSCRIPT; Redis errors pass through."""
        script = self._scripts[op]
        async with self.connection_cap:
            try:
                return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._reload(script)
                return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _reload(self, script: _Script) -> None:
        # Scripts gone: a restart or a flush (which took the registry too).
        if self.on_reload is not None:
            self.on_reload()
        script.sha = await self.redis.script_load(script.source)

    async def run_each(
        self, op: str, calls: Sequence[tuple[KeyPlan, tuple[Any, ...], tuple[Any, ...]]]
    ) -> list[Any]:
        """Run ``op`` once per ``(plan, args, tail)`` in one round trip where the client can.

        A standalone client pipelines the calls; a cluster client cannot pipeline scripts
        (each tag may live on another shard) and sends them all at once. Each result is
        the script's answer or the Redis error it got; LimiterUnavailable when every call
        failed.
        """
        argvs = [(plan.keys, plan.argv(op, *args, tail=tail)) for plan, args, tail in calls]
        if self.cluster:
            results = list(
                await asyncio.gather(
                    *(self.eval(op, keys, argv) for keys, argv in argvs), return_exceptions=True
                )
            )
            if results and all(isinstance(r, REDIS_ERRORS) for r in results):
                raise LimiterUnavailable(None, op, redact(results[0]))
            return results
        script = self._scripts[op]
        results = []
        for _attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for keys, argv in argvs:
                pipe.evalsha(script.sha, len(keys), *keys, *argv)
            try:
                results = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, op, redact(exc)) from exc
            if not any(isinstance(r, NoScriptError) for r in results):
                break
            try:
                await self._reload(script)
            except REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, op, redact(exc)) from exc
        return results
