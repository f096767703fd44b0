"""Events for metrics and tracing: the listeners a user adds, and how they are told.

Owns: the list of listeners. Every part that has news (admission, release, retries,
fail-open) calls :meth:`Events.emit`; ``if events.active`` first keeps the hot path free
of building fields nobody reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["Events", "Listener"]

log = logging.getLogger("limiter")

#: ``listener(event, api, fields)``: see :meth:`limiter.Limiter.add_listener`.
Listener = Callable[[str, str, dict[str, Any]], None]


class Events:
    """The listeners, called inline in the order they were added."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    @property
    def active(self) -> bool:
        """True when at least one listener is there to be told."""
        return bool(self._listeners)

    def add(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, api: str, **fields: Any) -> None:
        """Tell every listener; an exception in one is logged and ignored."""
        for listener in self._listeners:
            try:
                listener(event, api, fields)
            except Exception:
                log.exception("limiter listener failed on %s", event)
