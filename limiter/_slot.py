"""``Slot``, the caller's handle on one admission, and ``SlotState``, what the engine knows of it.

Owns: nothing in Redis. A :class:`Slot` holds one :class:`SlotState` and releases it
through the state's ``owner`` (the part that admitted it: ``_admission.Admission`` for
slots decided in Redis, ``_failopen.FailOpen`` for slots admitted locally while Redis was
unreachable). Only the owner changes a state's fields, except ``actual_tokens``
(:meth:`Slot.report_tokens`) and ``released``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from ._config import MAX_COUNT, show
from ._errors import ConfigError, LeaseLost

if TYPE_CHECKING:
    from ._contract import KeyPlan
    from ._local import LocalGate

__all__ = [
    "OUTCOME_FAILURE",
    "OUTCOME_SUCCESS",
    "Slot",
    "SlotContext",
    "SlotOwner",
    "SlotState",
    "to_the_end",
]

#: What a release counts in the totals (release.lua's OUTCOME).
OUTCOME_SUCCESS, OUTCOME_FAILURE = 1, 2


async def to_the_end(
    work: Coroutine[Any, Any, None], keep: Callable[[asyncio.Future[Any]], None]
) -> None:
    """Await ``work`` to its end even when the caller is cancelled meanwhile: it then
    finishes in the background, held by ``keep``, and the cancellation goes on."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        keep(task)
        raise


class SlotOwner(Protocol):
    """The part that admitted a slot and gives it back."""

    async def release_slot(self, state: SlotState, outcome: int) -> None: ...

    def keep(self, task: asyncio.Future[Any]) -> None: ...


@dataclass(slots=True, eq=False)
class SlotState:
    """One admission as its owner tracks it."""

    owner: SlotOwner
    plan: KeyPlan
    id: str
    #: Admission time, microseconds of Redis TIME (local slots: of this host's clock).
    acquired_at: int
    cost: int
    tokens: int
    #: Handed over by another process's release: its admission time may still be kept in
    #: Redis, and its first lease is a ticket's length until the renewer makes it full.
    handed: bool = False
    short_lease: bool = False
    #: Admitted by this process alone while Redis was unreachable (fail_open).
    local: bool = False
    #: The local share this slot counts in (fail_open), if any.
    gate: LocalGate | None = None
    actual_tokens: int = -1
    released: bool = False
    #: Admitted through the fair queue: its release corrects the service charged to its
    #: tenant by the tokens used.
    charged: bool = False
    lost: bool = False
    #: The deployment the scripts chose (None: the API has none, or a local slot).
    deployment: str | None = None
    #: The model the admission named ("": none).
    model: str = ""
    #: Input and output tokens reserved (the input and output budgets), and those
    #: reported (-1: not reported; a report of one number counts for both).
    tokens_in: int = 0
    tokens_out: int = 0
    actual_in: int = -1
    actual_out: int = -1

    def io_release(self) -> tuple[int, int, int, int]:
        """release.lua's RESERVED_IN, ACTUAL_IN, RESERVED_OUT, ACTUAL_OUT."""
        return self.tokens_in, self.actual_in, self.tokens_out, self.actual_out


class Slot:
    """One admission: a concurrency slot (a lease in Redis) plus one hit in every window.

    Release it exactly once, with ``await slot.release()`` or by leaving ``async with``.
    """

    __slots__ = ("_state",)

    def __init__(self, state: SlotState) -> None:
        self._state = state

    def __repr__(self) -> str:
        s = self._state
        state = "released" if s.released else ("lost" if s.lost else "held")
        where = " local" if s.local else ""
        return f"<Slot {self.api} {s.id} {state}{where}>"

    @property
    def api(self) -> str:
        """The API this slot admits a call to."""
        return self._state.plan.api

    @property
    def id(self) -> str:
        """Unique id of the slot (``"<process id>.<n>"``)."""
        return self._state.id

    @property
    def deployment(self) -> str | None:
        """The deployment (API key, base URL) this admission counts in, chosen by the
        scripts as the one with the most headroom; None when the API has none."""
        return self._state.deployment

    @property
    def model(self) -> str | None:
        """The model the admission named, or None."""
        return self._state.model or None

    @property
    def acquired_at(self) -> int:
        """Admission time, microseconds of Redis TIME (the cluster's one clock)."""
        return self._state.acquired_at

    @property
    def cost(self) -> int:
        """Weight of this admission in the request windows."""
        return self._state.cost

    @property
    def tokens(self) -> int:
        """Tokens reserved at admission."""
        return self._state.tokens

    @property
    def local(self) -> bool:
        """True when this process admitted it alone, Redis being unreachable (fail_open)."""
        return self._state.local

    @property
    def released(self) -> bool:
        """True once :meth:`release` (or leaving ``async with``) has begun."""
        return self._state.released

    @property
    def held(self) -> bool:
        """True until released, and while no renewal has found the lease gone."""
        return not self._state.released and not self._state.lost

    def report_tokens(self, n: int | tuple[int, int]) -> None:
        """Report the tokens really used, or ``(input, output)``; the reservation is
        corrected on release."""
        parts = list(n) if isinstance(n, tuple) else [n]
        if len(parts) not in (1, 2) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_COUNT for x in parts
        ):
            raise ConfigError(
                f"report_tokens(n={show(n)}): must be an integer from 0 to 2**53 - 1, or a "
                "pair (input, output) of them",
                field="tokens",
                value=n,
            )
        state = self._state
        state.actual_in, state.actual_out = parts[0], parts[-1]
        state.actual_tokens = sum(parts)

    async def release(self, *, success: bool = True) -> None:
        """Free the slot for the next waiter; counts a success or failure in ``stats()``.

        Idempotent. Raises :class:`LeaseLost` if the lease was found gone.
        """
        state = self._state
        if state.released:
            return
        state.released = True
        await state.owner.release_slot(state, OUTCOME_SUCCESS if success else OUTCOME_FAILURE)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        state = self._state
        if state.released:
            return
        state.released = True
        outcome = OUTCOME_SUCCESS if exc is None else OUTCOME_FAILURE
        try:
            await to_the_end(state.owner.release_slot(state, outcome), state.owner.keep)
        except LeaseLost as lost:
            if exc is None:
                raise
            exc.add_note(str(lost))


class SlotContext:
    """``async with lim.slot(...) as slot``: acquire on enter, release on exit."""

    __slots__ = ("_acquire", "_slot")

    def __init__(self, acquire: Any) -> None:
        #: A zero-argument coroutine function returning the admitted Slot.
        self._acquire = acquire
        self._slot: Slot | None = None

    async def __aenter__(self) -> Slot:
        self._slot = await self._acquire()
        return self._slot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._slot is not None:
            await self._slot.__aexit__(exc_type, exc, tb)
