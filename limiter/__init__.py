"""fleetlimit: a Redis-backed distributed rate limiter for outbound API calls.

Every admission is decided atomically in Redis by Lua scripts, for all replicas at once:
concurrency slots (leases), exact rolling windows, token budgets and provider cooldowns.
"""

from ._compat import ConcurrencyManager
from ._config import DEFAULT_LIMITS, APILimits, Rate
from ._errors import (
    AcquireTimeout,
    ConfigError,
    LeaseLost,
    LimiterError,
    LimiterUnavailable,
    ProviderAuthError,
)
from ._limiter import Limiter, Slot
from ._scope import scope

__all__ = [
    "DEFAULT_LIMITS",
    "APILimits",
    "AcquireTimeout",
    "ConcurrencyManager",
    "ConfigError",
    "LeaseLost",
    "Limiter",
    "LimiterError",
    "LimiterUnavailable",
    "ProviderAuthError",
    "Rate",
    "Slot",
    "scope",
]

__version__ = "0.1.0"
