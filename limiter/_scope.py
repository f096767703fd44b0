"""Who a request is for and how urgent it is: its tenant and priority in the fair queue.

Owns: the context variable behind :func:`scope`, which gives the tenant and priority of
calls made within a block (through the SDK clients and ``LimitedTransport`` too, which
call ``acquire`` without them), and :class:`Fair`, what one request carries to the
scripts. Pure: no I/O.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from ._config import APILimits, check_tenant, show
from ._errors import ConfigError

__all__ = ["DEFAULT_FAIR", "MAX_PRIORITY", "Fair", "check_priority", "fair_for", "scope"]

#: Priorities run from -MAX_PRIORITY to MAX_PRIORITY; higher is served first.
MAX_PRIORITY: Final = 1000

_SCOPE: ContextVar[tuple[str | None, int | None]] = ContextVar(
    "limiter_scope", default=(None, None)
)
#: The tokens of the scopes entered in this context, innermost last: one scope object may
#: be entered by several tasks at once (each task has its own context).
_ENTERED: ContextVar[tuple[Token[tuple[str | None, int | None]], ...]] = ContextVar(
    "limiter_scope_entered", default=()
)


def check_priority(priority: object) -> int:
    """A priority: an int from -1000 to 1000."""
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not -MAX_PRIORITY <= priority <= MAX_PRIORITY
    ):
        raise ConfigError(
            f"priority={show(priority)}: must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}",
            field="priority",
            value=priority,
        )
    return priority


@dataclass(frozen=True, slots=True)
class Fair:
    """A request's place in the fair queue: its tenant ("" when none), priority and the
    tenant's configured weight."""

    tenant: str = ""
    priority: int = 0
    weight: float = 1.0


DEFAULT_FAIR: Final = Fair()


def fair_for(limits: APILimits, tenant: object, priority: object) -> Fair:
    """The Fair of one request: explicit arguments first, then the enclosing
    :func:`scope`, then tenant ``""`` and priority 0. ConfigError on bad input."""
    if tenant is None or priority is None:
        scoped_tenant, scoped_priority = _SCOPE.get()
        if tenant is None:
            tenant = scoped_tenant
        if priority is None:
            priority = scoped_priority
    if tenant is None and priority is None:
        return DEFAULT_FAIR
    name = "" if tenant is None else check_tenant(tenant)
    level = 0 if priority is None else check_priority(priority)
    return Fair(name, level, limits.tenant_weights.get(name, 1.0))


class scope:  # used like a function: ``with limiter.scope(tenant=...):``
    """``with limiter.scope(tenant="user-42", priority=10):`` the tenant and priority of
    every admission made within the block (``async with`` works too), by this task and
    the tasks it starts. Arguments given to ``acquire``/``slot``/``call`` win; a scope
    inside another changes only what it names. One scope object may be entered again,
    and by several tasks at once."""

    __slots__ = ("_priority", "_tenant")

    def __init__(self, *, tenant: str | None = None, priority: int | None = None) -> None:
        self._tenant = None if tenant is None else check_tenant(tenant)
        self._priority = None if priority is None else check_priority(priority)

    def __enter__(self) -> None:
        outer_tenant, outer_priority = _SCOPE.get()
        token = _SCOPE.set(
            (
                outer_tenant if self._tenant is None else self._tenant,
                outer_priority if self._priority is None else self._priority,
            )
        )
        _ENTERED.set((*_ENTERED.get(), token))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entered = _ENTERED.get()
        if entered:
            _ENTERED.set(entered[:-1])
            _SCOPE.reset(entered[-1])

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"limiter.scope(tenant={self._tenant!r}, priority={self._priority!r})"
