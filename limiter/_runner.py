"""The script runner: the one way the limiter's Lua scripts reach Redis.

Owns: the Redis client handle as the scripts use it; how the operations run there, as a
Redis Functions library (FCALL; Redis 7.0+, loaded on first contact, on every primary of
a cluster, and again when Redis lost it) or as scripts (EVALSHA, loaded again on
NOSCRIPT: Redis 6.2, fakeredis, or a user without the FUNCTION right); the one-time
``initialize()`` of a cluster client; the cluster connection cap; and the mapping of
Redis errors to
:class:`LimiterUnavailable`. Called by the admission, waiting, fail-open and registry
parts; it calls none of them (a reload is reported through its ``on_reload`` callback).

The two ways run the same Lua: the library is loaded once, so an FCALL creates none of
the shared functions again; an EVAL script makes them at every call (measured with
callgrind on Redis 7.0: about a third of an uncontended acquire + release).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._contract import OPERATIONS, KeyPlan
from ._errors import LimiterUnavailable
from ._lua import library_source, lua_source

__all__ = ["NO_PASSWORD", "REDIS_ERRORS", "ScriptRunner", "is_outage", "needs_password", "redact"]

#: What a Redis client raises when Redis fails: redis-py's cluster client raises
#: RedisClusterException (not a RedisError) for a slot it cannot route, e.g. CROSSSLOT.
REDIS_ERRORS = (RedisError, RedisClusterException)

#: Redis errors that mean "unreachable for now" (fail_open admits locally); every other
#: error (a wrong password, a denied command, CROSSSLOT) is raised under both policies.
_OUTAGES = (RedisConnectionError, RedisTimeoutError, ClusterDownError, ReadOnlyError)
_NOT_OUTAGES = (AuthenticationError, AuthorizationError)

#: The connection cap of a client that needs none (standalone, Sentinel): does nothing.
_NO_CAP: contextlib.nullcontext[None] = contextlib.nullcontext()


#: What a client that sent no password hears from a Redis that requires one (NOAUTH):
#: redis-py's HELLO (RESP3) gets the first, any other first command (RESP2) the second.
_NOAUTH = (
    "HELLO must be called with the client already authenticated",
    "Authentication required",
)
#: ... and a command too long for a client not yet authenticated (a FUNCTION LOAD, an
#: EVALSHA with many keys) gets a protocol error instead, and its connection closed.
_UNAUTHENTICATED = "Protocol error: unauthenticated "
#: The message that replaces them: the fix is in the URL.
NO_PASSWORD = "Redis requires a password; the URL has none"


def needs_password(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a client that gave no password."""
    if isinstance(exc, AuthenticationError):
        return str(exc).startswith(_NOAUTH)
    return isinstance(exc, ResponseError) and str(exc).startswith(_UNAUTHENTICATED)


def redact(exc: BaseException) -> str:
    """A Redis error as text for our messages (redis-py never puts passwords in them).

    A client that gave no password to a Redis that requires one is told so in those words
    (redis-py's own text speaks of HELLO and RESP versions).
    """
    if needs_password(exc):
        return NO_PASSWORD
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


def _function_missing(exc: BaseException) -> bool:
    return "function not found" in str(exc).lower()


def _honour_swallowed_cancel(task: asyncio.Task[Any] | None, cancels: int) -> None:
    """Raise CancelledError when ``task`` was cancelled since it counted ``cancels``:
    redis-py (8.1, on Python 3.11) can swallow a cancellation that arrives while a command
    is being sent; honoured here, the caller's cleanup runs."""
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError


class ScriptRunner:
    """Runs the operations of ``limiter/_contract.py`` on one Redis client."""

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
        self._ready_lock = asyncio.Lock()
        self._library, self._library_code = library_source()
        #: The library's function of each per-API operation.
        self._functions = {
            name: f"{self._library}_{name}" for name, op in OPERATIONS.items() if op.per_api
        }
        #: True when the operations run as the Functions library (FCALL).
        self.functions = False
        #: Script calls Redis answered so far (parts that say something once per outage
        #: compare it: a change means Redis answered since).
        self.answers = 0
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

    @property
    def is_ready(self) -> bool:
        """True once :meth:`ready` has run."""
        return self._ready

    async def ready(self) -> bool:
        """Initialize a cluster client and load the library, once; True on the call that
        did it (first contact). Concurrent first calls wait for that one."""
        if self._ready:
            return False
        async with self._ready_lock:
            if self._ready:
                return False
            # redis-py's asyncio RedisCluster must be initialized before concurrent use.
            init = getattr(self.redis, "initialize", None)
            if init is not None and self.cluster:
                try:
                    await init()
                except REDIS_ERRORS as exc:
                    raise LimiterUnavailable(None, "connect", redact(exc)) from exc
            if not type(self.redis).__module__.startswith("fakeredis"):
                self.functions = await self._load_library()
            self._ready = True
            return True

    async def _load_library(self) -> bool:
        """Load the Functions library; False when this Redis cannot or may not (6.2, no
        FUNCTION right): the operations then run as EVALSHA scripts."""
        try:
            async with self.connection_cap:
                await self.redis.function_load(self._library_code)
        except REDIS_ERRORS as exc:
            if "already exists" in str(exc):
                return True
            if isinstance(exc, RedisConnectionError | RedisTimeoutError) or needs_password(exc):
                raise LimiterUnavailable(None, "connect", redact(exc)) from exc
            return False
        return True

    def run(
        self,
        op: str,
        plan: KeyPlan,
        *args: Any,
        tail: tuple[Any, ...] = (),
        retry_args: tuple[Any, ...] | None = None,
        label: str | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Run per-API operation ``op`` for ``plan`` with its own ``args`` (as named).

        A connection found closed (a Redis restart, a dropped pooled connection) is tried
        once more on a fresh one, with ``retry_args`` when given: every script is written
        so that running it again after an unseen first run does no harm (acquire asks
        again as a waiter would, and finds its slot if the first run admitted it).
        """
        argv = plan.argv(op, *args, tail=tail)
        again = None
        if retry_args is not None:  # laid out only if a retry happens

            def again() -> tuple[Any, ...]:
                return plan.argv(op, *retry_args, tail=tail)

        # A coroutine returned, not awaited here: one frame less on the hot path.
        return self.call(op, plan.keys, argv, plan.api, label or op, again)

    async def call(
        self,
        op: str,
        keys: Sequence[bytes],
        args: Sequence[Any],
        api: str | None,
        label: str,
        retry_args: Callable[[], Sequence[Any]] | None = None,
    ) -> Any:
        """EVALSHA script ``op``; LimiterUnavailable(api, label) when Redis fails.
        ``retry_args()`` is the ARGV of a second try on a fresh connection."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            try:
                result = await self.eval(op, keys, args)
            except RedisConnectionError:
                result = await self.eval(op, keys, args if retry_args is None else retry_args())
        except REDIS_ERRORS as exc:
            raise LimiterUnavailable(api, label, redact(exc)) from exc
        self.answers += 1
        _honour_swallowed_cancel(task, cancels)
        return result

    async def command(self, api: str | None, label: str, *args: Any) -> Any:
        """One plain Redis command (``args``: its name, then its arguments) as the scripts
        go: under the connection cap, Redis errors as LimiterUnavailable(api, label), and a
        cancellation redis-py swallowed raised again."""
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            async with self.connection_cap:
                result = await self.redis.execute_command(*args)
        except REDIS_ERRORS as exc:
            raise LimiterUnavailable(api, label, redact(exc)) from exc
        self.answers += 1
        _honour_swallowed_cancel(task, cancels)
        return result

    async def eval(self, op: str, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        """FCALL or EVALSHA, loading the code again when Redis lost it; Redis errors pass
        through."""
        name = self._functions.get(op) if self.functions else None
        if name is not None:
            try:
                async with self.connection_cap:
                    return await self.redis.execute_command("FCALL", name, len(keys), *keys, *args)
            except ResponseError as exc:
                if not _function_missing(exc):
                    raise
            await self._reload_library()
            async with self.connection_cap:
                return await self.redis.execute_command("FCALL", name, len(keys), *keys, *args)
        script = self._scripts[op]
        async with self.connection_cap:
            try:
                return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                await self._reload(script)
                return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    async def _reload_library(self) -> None:
        # The library is gone: a restart without persistence, a FUNCTION FLUSH.
        if self.on_reload is not None:
            self.on_reload()
        if not await self._load_library():
            raise ResponseError("the limiter's Functions library could not be loaded again")

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
        name = f"{self._library}_{op}"
        results = []
        for _attempt in range(2):
            functions = self.functions
            pipe = self.redis.pipeline(transaction=False)
            for keys, argv in argvs:
                if functions:
                    pipe.fcall(name, len(keys), *keys, *argv)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *argv)
            try:
                results = await pipe.execute(raise_on_error=False)
            except REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, op, redact(exc)) from exc
            self.answers += 1
            if functions:
                lost = any(isinstance(r, ResponseError) and _function_missing(r) for r in results)
            else:
                lost = any(isinstance(r, NoScriptError) for r in results)
            if not lost:
                break
            try:
                await (self._reload_library() if functions else self._reload(script))
            except REDIS_ERRORS as exc:
                raise LimiterUnavailable(None, op, redact(exc)) from exc
        return results
