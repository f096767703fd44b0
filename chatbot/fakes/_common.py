"""What both fakes share: the referee's rolling-window count and the announcing server.

Owns :func:`max_in_window` (the most events, or the most weight, inside any rolling
window: both records use it for their maxima) and :class:`AnnouncingServer` (the uvicorn
server that prints its address once it listens: both command lines use it, and the tests
read that line). Used by ``chatbot.fakes.openai_server`` and ``chatbot.fakes.zapier_server``;
like them, it imports nothing of ``limiter`` or of the rest of ``chatbot``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import uvicorn

__all__ = ["AnnouncingServer", "max_in_window"]


def max_in_window(
    times: Sequence[float], window: float, weights: Sequence[int] | None = None
) -> int:
    """The largest count (or weight) of events inside any rolling window of ``window`` seconds.

    A window ending at ``t`` holds the events in ``(t - window, t]``, as the fake's own
    admission check counts them. Exact: sorted times and two pointers, O(n log n).
    """
    order = sorted(range(len(times)), key=times.__getitem__)
    w = [1] * len(times) if weights is None else list(weights)
    best = current = 0
    lo = 0
    for j in order:
        current += w[j]
        while times[order[lo]] <= times[j] - window:
            current -= w[order[lo]]
            lo += 1
        best = max(best, current)
    return best


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints ``announce(port)`` once it is listening."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[int], str]) -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            port = self.servers[0].sockets[0].getsockname()[1]
            print(self.announce(port), flush=True)
