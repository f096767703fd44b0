"""Configuration is validated up front, with errors that name the field and the value."""

from __future__ import annotations

import math
from typing import Any

import fakeredis
import pytest

from chatbot.settings import Settings
from limiter import DEFAULT_LIMITS, APILimits, ConfigError, Limiter, LimiterError, Rate


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_concurrent": 0}, "APILimits.max_concurrent"),
        ({"max_concurrent": -3}, "APILimits.max_concurrent"),
        ({"max_concurrent": 2.5}, "APILimits.max_concurrent"),
        ({"max_concurrent": 5.0}, "APILimits.max_concurrent"),
        ({"max_concurrent": True}, "APILimits.max_concurrent"),
        ({"max_concurrent": "8"}, "APILimits.max_concurrent"),
        ({"requests_per_minute": 0}, "APILimits.requests_per_minute"),
        ({"requests_per_hour": -1}, "APILimits.requests_per_hour"),
        ({"tokens_per_minute": math.nan}, "APILimits.tokens_per_minute"),
        ({"retry_attempts": 0}, "APILimits.retry_attempts"),
        ({"backoff_min": math.nan}, "APILimits.backoff_min"),
        ({"backoff_max": math.inf}, "APILimits.backoff_max"),
        ({"backoff_min": -1.0}, "APILimits.backoff_min"),
        ({"backoff_min": 10.0, "backoff_max": 5.0}, "APILimits.backoff_min"),
        ({"lease_ttl": 0}, "APILimits.lease_ttl"),
        ({"lease_ttl": math.inf}, "APILimits.lease_ttl"),
        ({"lease_ttl": 0.01}, "APILimits.lease_ttl"),
        ({"acquire_timeout": -1}, "APILimits.acquire_timeout"),
        ({"acquire_timeout": math.nan}, "APILimits.acquire_timeout"),
        ({"rates": [object()]}, "APILimits.rates[0]"),
        ({"window_margin": -0.1}, "APILimits.window_margin"),
        ({"window_margin": math.inf}, "APILimits.window_margin"),
        ({"rates": "5/s"}, "APILimits.rates"),
        ({"requests_per_minute": 5, "rates": [Rate(9, 60)]}, "APILimits.rates"),
    ],
)
def test_invalid_api_limits_name_field_and_value(kwargs: dict[str, Any], field: str) -> None:
    """Each invalid APILimits value raises ConfigError naming the field and showing the value."""
    with pytest.raises(ConfigError) as info:
        APILimits(**kwargs)
    assert info.value.field == field
    assert field.rsplit(".", maxsplit=1)[-1].split("[", maxsplit=1)[0] in str(info.value)
    shown = next(iter(kwargs.values())) if len(kwargs) == 1 else kwargs.get("backoff_min")
    if not isinstance(shown, list) and field != "APILimits.rates":
        assert repr(shown) in str(info.value)


@pytest.mark.parametrize(
    ("limit", "period", "field"),
    [
        (0, 1.0, "Rate.limit"),
        (-5, 1.0, "Rate.limit"),
        (1.5, 1.0, "Rate.limit"),
        (5, 0, "Rate.period"),
        (5, -1.0, "Rate.period"),
        (5, math.nan, "Rate.period"),
        (5, math.inf, "Rate.period"),
        (5, 0.0001, "Rate.period"),
    ],
)
def test_invalid_rate(limit: Any, period: Any, field: str) -> None:
    """Rate rejects non-positive, non-integer limits and non-finite or tiny periods."""
    with pytest.raises(ConfigError) as info:
        Rate(limit, period)
    assert info.value.field == field
    assert info.value.value in (limit, period) or math.isnan(info.value.value)


def test_config_error_is_a_value_error_and_limiter_error() -> None:
    """ConfigError can be caught as ValueError or as LimiterError."""
    with pytest.raises(ValueError, match="max_concurrent=0"):
        APILimits(max_concurrent=0)
    assert issubclass(ConfigError, LimiterError)


def test_default_limits_are_the_original_chatbot_s() -> None:
    """DEFAULT_LIMITS holds openai 8/500/10,000, 5 attempts 1-60 s and zapier 3/60/75, 3, 2-30 s."""
    oa, za = DEFAULT_LIMITS["openai"], DEFAULT_LIMITS["zapier"]
    assert (oa.max_concurrent, oa.requests_per_minute, oa.requests_per_hour) == (8, 500, 10_000)
    assert (oa.retry_attempts, oa.backoff_min, oa.backoff_max) == (5, 1.0, 60.0)
    assert (za.max_concurrent, za.requests_per_minute, za.requests_per_hour) == (3, 60, 75)
    assert (za.retry_attempts, za.backoff_min, za.backoff_max) == (3, 2.0, 30.0)
    assert [r.reason for r in oa.windows] == ["rate:60s", "rate:3600s"]
    with pytest.raises(TypeError):
        DEFAULT_LIMITS["other"] = APILimits()  # type: ignore[index]


def test_windows_combine_sugar_and_rates() -> None:
    """requests_per_minute/hour become 60 s and 3600 s windows beside the explicit rates."""
    lim = APILimits(requests_per_minute=10, requests_per_hour=100, rates=[Rate(2, 0.5)])
    assert lim.windows == (Rate(10, 60.0), Rate(100, 3600.0), Rate(2, 0.5))
    assert Rate(2, 0.5).reason == "rate:0.5s"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"namespace": ""}, "namespace"),
        ({"namespace": "a{b}"}, "namespace"),
        ({"on_redis_error": "ignore"}, "on_redis_error"),
        ({"ticket_ttl": 0}, "ticket_ttl"),
        ({"stats_ttl": math.nan}, "stats_ttl"),
    ],
)
def test_invalid_limiter_arguments(kwargs: dict[str, Any], field: str) -> None:
    """Limiter rejects a bad namespace, failure policy or TTL with a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        Limiter(fakeredis.FakeAsyncRedis(), {"a": APILimits()}, **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("limits", "field"),
    [
        ({"bad name": APILimits()}, "api"),
        ({"a{b}": APILimits()}, "api"),
        ({"": APILimits()}, "api"),
        ({"openai": {"max_concurrent": 8}}, "limits['openai']"),
        ([("openai", APILimits())], "limits"),
    ],
)
def test_invalid_limits_mapping(limits: Any, field: str) -> None:
    """API names must be safe hash tags and each value an APILimits."""
    with pytest.raises(ConfigError) as info:
        Limiter(fakeredis.FakeAsyncRedis(), limits)
    assert info.value.field == field


@pytest.mark.parametrize("name", ["MESSAGE_TIMEOUT", "TURN_LEASE", "TICKET_TTL"])
@pytest.mark.parametrize("raw", ["abc", "", "-1", "0", "nan", "inf"])
def test_chatbot_durations_from_the_environment_are_checked(name: str, raw: str) -> None:
    """A replica started with a bad duration says which variable and value, at start."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: raw})
    assert info.value.field == name
    assert name in str(info.value)
    assert repr(raw) in str(info.value)


def test_chatbot_durations_from_the_environment_are_read() -> None:
    settings = Settings.from_env({"MESSAGE_TIMEOUT": "2.5", "TURN_LEASE": "7", "TICKET_TTL": "3"})
    assert (settings.message_timeout, settings.turn_lease, settings.ticket_ttl) == (2.5, 7.0, 3.0)
