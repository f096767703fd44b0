"""The limiter's exceptions.

Every error the limiter raises on purpose is a :class:`LimiterError`::

    LimiterError
    ├── ConfigError          (also ValueError)   bad limits, unknown API, impossible request
    ├── AcquireTimeout       (also TimeoutError) the wait for admission ran out
    ├── LimiterUnavailable                       Redis unreachable or erroring (fail_closed)
    ├── LeaseLost                                a held slot's lease was found gone
    └── ProviderAuthError                        the provider refused our credentials (401/403)

Errors carry their context as attributes (``api``, ``reason``, ``waited``, ``status``) and
never a secret: messages name APIs, fields and values, not URLs with passwords, keys or tokens.
"""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "ConfigError",
    "LeaseLost",
    "LimiterError",
    "LimiterUnavailable",
    "ProviderAuthError",
]


class LimiterError(Exception):
    """Base class of every error the limiter raises on purpose."""


class ConfigError(LimiterError, ValueError):
    """A limit or argument is invalid, or names an API that is not configured.

    ``field`` and ``value`` say what was wrong (``value`` is ``None`` when not applicable).
    """

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        #: The offending field, e.g. ``"APILimits.max_concurrent"``.
        self.field = field
        #: The offending value.
        self.value = value


class AcquireTimeout(LimiterError, TimeoutError):
    """No admission within the allowed wait.

    ``reason`` is the limit that held the request back last: ``"concurrency"``,
    ``"rate:<period>s"``, ``"tokens"`` or ``"cooldown"``.
    """

    def __init__(self, api: str, reason: str, waited: float) -> None:
        super().__init__(
            f"no admission for API {api!r} after {waited:.3f}s (held back by {reason})"
        )
        #: The API that was asked for.
        self.api = api
        #: Which limit refused last.
        self.reason = reason
        #: Seconds spent waiting.
        self.waited = waited


class LimiterUnavailable(LimiterError):
    """Redis could not be reached or answered with an error (under ``fail_closed``).

    The Redis exception is the ``__cause__``.
    """

    def __init__(self, api: str | None, operation: str, detail: str) -> None:
        where = f" for API {api!r}" if api else ""
        super().__init__(f"limiter unavailable during {operation}{where}: {detail}")
        #: The API concerned, when there is one.
        self.api = api
        #: What the limiter was doing: ``"acquire"``, ``"release"``, ``"renew"``, ...
        self.operation = operation


class LeaseLost(LimiterError):
    """A held slot's lease was gone when renewed or released (expired, or lost in a failover).

    The work under the slot ran, but for some of that time the cluster no longer counted it.
    """

    def __init__(self, api: str, slot_id: str) -> None:
        super().__init__(f"lease of slot {slot_id!r} for API {api!r} was lost before release")
        #: The API of the slot.
        self.api = api
        #: The slot's id.
        self.slot_id = slot_id


class ProviderAuthError(LimiterError):
    """The provider refused our credentials (HTTP 401/403); retrying cannot help.

    Raised by :func:`limiter.http.zapier_mcp` (whose SDK would report a refused token as a
    bare error) and by :func:`limiter.http.anthropic_client` (through the SDK's middleware,
    instead of its own error). The message names the API and the status, never the
    credentials.
    """

    def __init__(self, api: str, status: int, *, display: str | None = None) -> None:
        super().__init__(
            f"{display or api} answered HTTP {status}: the API key or token was refused"
        )
        #: The API concerned.
        self.api = api
        #: The HTTP status (401 or 403).
        self.status = status
