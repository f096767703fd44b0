"""Runtime operations on one API, for every replica: cooldowns, stats, overrides of the
limits, limits learned from the provider, a reset, tenants' weights.

Owns no state of its own: each operation runs its script (and, where the queue may move,
``move``) through the :class:`~limiter._runner.ScriptRunner` it is handed, once the
registry of configurations is written. Called only by :class:`~limiter.Limiter`'s public
methods, which check the API (and key) and hand over its :class:`~limiter._contract.KeyPlan`;
the views of the replies are :mod:`limiter._admin`'s.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _admin
from ._checks import check_cooldown, check_seconds
from ._config import APILimits, Rate, check_tenant, check_weight
from ._contract import KeyPlan, text
from ._errors import LimiterUnavailable

if TYPE_CHECKING:
    from ._failopen import FailOpen
    from ._registry import Registry
    from ._runner import ScriptRunner

__all__ = ["Operators"]

log = logging.getLogger("limiter")


class Operators:
    """What operators, the retry loop and the HTTP transport change at run time."""

    def __init__(
        self,
        runner: ScriptRunner,
        registry: Registry,
        namespace: str,
        fail_open: FailOpen | None,
    ) -> None:
        self._runner, self._registry, self._namespace = runner, registry, namespace
        self._fail_open = fail_open

    async def ready(self) -> None:
        """Redis reached (the scripts loaded) and this limiter's configurations registered."""
        if not self._runner.is_ready:
            await self._runner.ready()
        self._registry.maybe_write()

    async def cooldown(self, plan: KeyPlan, seconds: float, scope: str = "") -> float:
        """Pause ``plan``'s API (``scope``: one of its limit sets) for every replica."""
        number = check_cooldown(seconds)
        ms = max(1, math.ceil(number * 1000))
        fail_open = self._fail_open
        if fail_open is not None and not scope:
            # Remembered here too: while Redis is unreachable the local shares honour it.
            fail_open.pause(plan, number)
            if fail_open.open:
                return number
        try:
            await self.ready()
            left = await self._runner.run("cooldown", plan, ms, scope)
        except LimiterUnavailable as exc:
            if fail_open is None or not fail_open.absorb(exc):
                raise
            return number
        return int(left) / 1000

    async def stats(self, plan: KeyPlan, limits: APILimits, keyed: bool) -> dict[str, Any]:
        await self.ready()
        reply = await self._runner.run("stats", plan)
        if not keyed and not int(reply[7]):
            # The registry entry is gone (a flush): write it again.
            self._registry.lost()
            self._registry.maybe_write()
        view = _admin.stats_view(plan, limits, reply)
        if not keyed:  # the response cache (limiter.http.ResponseCache) counts per API
            view["cache"] = await _admin.cache_counts(self._runner, self._namespace, plan.api)
        return view

    async def set_limits(
        self,
        plan: KeyPlan,
        ttl: float | None,
        max_concurrent: int | None,
        requests_per_minute: int | None,
        requests_per_hour: int | None,
        rates: Sequence[Rate],
        tokens_per_minute: int | None,
    ) -> dict[str, Any]:
        fields = _admin.override_fields(
            plan,
            max_concurrent=max_concurrent,
            requests_per_minute=requests_per_minute,
            requests_per_hour=requests_per_hour,
            rates=rates,
            tokens_per_minute=tokens_per_minute,
        )
        ttl_ms = _admin.check_ttl(ttl)
        await self.ready()
        return await _admin.set_override(self._runner, plan, fields, ttl, ttl_ms)

    async def learn_limits(
        self,
        plan: KeyPlan,
        reported: Sequence[int | None],
        ttl: float,
        where: tuple[str | None, str | None] = (None, None),
        io: Sequence[int | None] = (None, None, None, None),
    ) -> dict[str, Any]:
        """learn.lua in the limit set ``where`` (deployment, model) names; ``io``: the input
        budget's limit and remaining, then the output budget's, each in the most specific
        input (output) budget that applies there."""
        scope = plan.scope(*where)
        calls = [(scope, _admin.learned_fields(plan, reported, scope))]
        for end, (limit, left) in (("in", io[:2]), ("out", io[2:])):
            io_scope = plan.io_scope(*where, end)
            if io_scope is not None and (limit is not None or left is not None):
                calls.append((io_scope, _admin.learned_io_fields(end, limit, left)))
        ttl_ms = max(1, math.ceil(check_seconds("ttl", ttl, 0.001) * 1000))
        await self.ready()
        view: dict[str, Any] = {}
        for at, pairs in calls:
            if pairs or at == scope:
                flat, left_ms = await self._runner.run(
                    "learn", plan, ttl_ms, at, tail=pairs, label="learn"
                )
                view.update(_admin.learned_view(plan, flat, int(left_ms)))
        return view

    async def clear_limits(self, plan: KeyPlan) -> None:
        await self.ready()
        await self._runner.run("override", plan, 0, label="clear_limits")
        log.info("API %r: limits override cleared", plan.api)
        await self._runner.run("move", plan, label="clear_limits")

    async def reset(self, plan: KeyPlan) -> int:
        await self.ready()
        await self._runner.run("reset", plan)
        removed = await _admin.remove_old_layout(self._runner, plan)
        log.info("API %r: state reset in namespace %r", plan.api, self._namespace)
        return removed

    async def set_tenant_weight(
        self, plan: KeyPlan, tenant: str | None, weight: float | None, ttl: float | None
    ) -> dict[str, float]:
        name = "" if tenant is None else check_tenant(tenant)
        value = "" if weight is None else repr(check_weight(weight))
        ttl_ms = 0 if ttl is None else max(1, math.ceil(check_seconds("ttl", ttl, 0.001) * 1000))
        await self.ready()
        reply = await self._runner.run(
            "weight", plan, name, value, ttl_ms, label="set_tenant_weight"
        )
        shown = "cleared" if weight is None else value
        log.info("API %r: tenant %r weight %s", plan.api, name, shown)
        return {text(reply[i]): float(reply[i + 1]) for i in range(0, len(reply), 3)}
