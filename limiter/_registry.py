"""The registry of configurations: each API's admission settings, written where operators look.

Owns: when this limiter next writes ``<ns>:{api}:config`` and ``<ns>:apis`` (on first
contact, every half ``stats_ttl`` while used, 5 s after a failed write, at once after
Redis lost its scripts, which a flush or restart does), and which APIs it already warned
about. The JSON and the key names are ``_admin``'s; the writes go through the runner's
client, under its connection cap.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from . import _admin
from ._config import APILimits
from ._contract import text
from ._runner import REDIS_ERRORS, ScriptRunner, redact

__all__ = ["Registry"]

log = logging.getLogger("limiter")

#: After a failed registry write, the next script call this many seconds on tries again.
_RETRY = 5.0


class Registry:
    """Writes this limiter's configurations to the registry, now and then."""

    def __init__(
        self,
        runner: ScriptRunner,
        namespace: str,
        limits: Mapping[str, APILimits],
        stats_ttl: float,
        *,
        enabled: bool,
    ) -> None:
        self._runner = runner
        self._namespace = namespace
        self._limits = limits
        self._stats_ttl = stats_ttl
        self._enabled = enabled
        self._due = 0.0 if enabled else math.inf
        self._warned: set[str] = set()
        #: Writes under way.
        self.tasks: set[asyncio.Future[Any]] = set()

    def lost(self) -> None:
        """Redis lost its scripts (a flush, a restart): it lost the registry too."""
        if self._enabled:
            self._due = 0.0

    def maybe_write(self) -> None:
        """Start a write in the background when one is due."""
        if time.monotonic() < self._due:
            return
        # The entries live stats_ttl (like the totals) and are written again every half of
        # it while this limiter is used, so that an API nobody runs any more fades away.
        self._due = time.monotonic() + self._stats_ttl / 2
        if self._limits:
            task = asyncio.ensure_future(self._write())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _write(self) -> None:
        """Put each API's limits in the registry; warn when another replica's differ."""
        ttl_ms = round(self._stats_ttl * 1000)
        redis = self._runner.redis
        apis = _admin.apis_key(self._namespace)
        try:
            for api, limits in self._limits.items():
                ours = _admin.config_json(limits)
                key = _admin.config_key(self._namespace, api)
                async with self._runner.connection_cap:
                    theirs = await redis.set(key, ours, px=ttl_ms, get=True)
                    await redis.sadd(apis, api)
                    await redis.pexpire(apis, ttl_ms)
                if theirs is not None and text(theirs) != ours and api not in self._warned:
                    self._warned.add(api)
                    self._warn(api, ours, text(theirs))
        except REDIS_ERRORS as exc:  # the registry is for operators: admission goes on
            self._due = time.monotonic() + _RETRY
            log.debug("could not write the limits registry (again in %gs): %s", _RETRY, redact(exc))

    def _warn(self, api: str, ours: str, theirs: str) -> None:
        try:
            differ = _admin.describe_difference(ours, theirs)
        except ValueError:
            differ = "what Redis holds is not a limiter configuration"
        log.warning(
            "API %r: this limiter's limits differ from those another limiter registered in "
            "namespace %r (%s). Every replica must configure an API alike: the scripts admit "
            "by the caller's limits.",
            api,
            self._namespace,
            differ,
        )

    async def aclose(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
