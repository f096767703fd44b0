"""Load driver: users sending messages to the replicas, like a messaging app would.

Optionally, while they do, a noisy user who sends many times their messages and a batch
job (``POST /batch``, the limiter's lowest priority of the chatbot) press on the same
limits: ``python -m chatbot cluster --noisy-user`` compares what the others see.

Optionally too (``faq_every``), some users open with a question many ask alike
(:data:`FAQ_TEXTS`): identical requests across users and replicas, what the replicas'
response cache answers (``python -m chatbot cluster --cache``).

And (``large_every``) some messages ask for an answer :data:`LARGE_KEYWORD`, which a
replica with ``OPENAI_LARGE_MODEL`` answers with that model (``chatbot.settings``).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2

__all__ = [
    "BATCH_JOB",
    "FAQ_TEXTS",
    "LARGE_KEYWORD",
    "NOISY_USER",
    "LoadResult",
    "percentile",
    "run_load",
]

TOOL_TEXTS = (
    "Please send an email to ana@example.com saying the order shipped",
    "Add a spreadsheet row with today's sales to the Sales sheet",
    "Create a calendar event for the team meeting tomorrow",
)
#: Questions many users open a conversation with, word for word, and that need no tool
#: (no Zapier tool's name or keyword in them). A conversation's first message is the only
#: one two users can send identically: later ones carry the user's history.
FAQ_TEXTS = (
    "What are your opening hours?",
    "Do you ship to Canada?",
    "How do I reset my password?",
)
#: The noisy user's id (ordinary users are user-000, user-001, ...).
NOISY_USER = "noisy-user"
#: The batch job's name: its tenant in the limiter's fair queue.
BATCH_JOB = "batch-jobs"
#: What a message asks for when it wants the larger model (``large_every``): the chatbot's
#: default ``OPENAI_LARGE_MODEL_KEYWORD``.
LARGE_KEYWORD = "in detail"


def percentile(data: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``data`` (nearest rank, the higher one); 0.0 when empty."""
    if not data:
        return 0.0
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class LoadResult:
    """What the users saw."""

    sent: int = 0
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    #: Per answered message, the seconds its calls waited in the limiter (the replica's
    #: ``limiter_wait``: every OpenAI and Zapier admission of the message, summed).
    waits: list[float] = field(default_factory=list)
    tool_calls: int = 0
    #: Answered messages that asked for an answer :data:`LARGE_KEYWORD` (``large_every``).
    large_messages: int = 0
    #: Answered messages whose answer ran at least one Zapier tool (each of those takes a
    #: second OpenAI completion: the model asks for the tool, then answers with its result).
    tool_messages: int = 0
    #: With ``duration``: messages still unanswered when the load stopped (not errors).
    cut_off: int = 0
    #: Messages sent again to another replica after one failed to answer (crashed).
    resent: int = 0
    started: float = 0.0
    finished: float = 0.0
    #: Per user, the order in which its replies came back (message numbers).
    order: dict[str, list[int]] = field(default_factory=dict)
    #: With ``faq_every``: the users' first messages that were one of :data:`FAQ_TEXTS`,
    #: and those of them sent after another user's identical first message had its answer
    #: (which a response cache then holds: each such repeat is a hit).
    faq: int = 0
    faq_repeats: int = 0
    #: Messages the noisy user or the batch job meant to send (0: as many as it could).
    planned: int = 0
    #: With ``noisy``: what the noisy user saw; with ``batch_workers``: the batch job.
    noisy: LoadResult | None = None
    batch: LoadResult | None = None

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    def percentile(self, q: float) -> float:
        """A quantile of the time from sending a message to its answer, seconds."""
        return percentile(self.latencies, q)

    def wait_percentile(self, q: float) -> float:
        """A quantile of the messages' waits in the limiter, seconds."""
        return percentile(self.waits, q)

    def slowest(self, q: float) -> list[tuple[float, float]]:
        """``(time to answer, wait in the limiter)`` of the messages answered in at least
        the ``q`` quantile of the time to answer (``q=0.99``: the slowest 1%, at least one)."""
        cut = self.percentile(q)
        return [(t, w) for t, w in zip(self.latencies, self.waits, strict=True) if t >= cut]


async def run_load(
    targets: Sequence[str],
    users: int,
    messages: int,
    *,
    tool_every: int = 3,
    timeout: float = 180.0,
    progress: Callable[[LoadResult], None] | None = None,
    seed: int = 7,
    noisy: int = 0,
    noisy_in_flight: int = 4,
    batch_workers: int = 0,
    duration: float | None = None,
    faq_every: int = 0,
    large_every: int = 0,
) -> LoadResult:
    """``users`` users each send ``messages`` messages, one after the other, to replicas
    taken in turn; every ``tool_every``-th message asks for a Zapier action.

    With ``noisy``, one more user (:data:`NOISY_USER`) means to send ``noisy`` times as
    many, ``noisy_in_flight`` at once without waiting for the answers; with
    ``batch_workers``, a batch job (:data:`BATCH_JOB`) keeps that many items in flight at
    ``POST /batch``. Both stop sending when the ordinary users have their last answer
    (what is in flight then is still awaited) and report in ``noisy`` and ``batch``; the
    result's own figures are the ordinary users'.

    With ``duration``, the users stop after that many seconds: what they have not sent is
    not sent, and the messages then unanswered are abandoned (counted in ``cut_off``).

    With ``faq_every``, every ``faq_every``-th user (user 0, then user ``faq_every``, ...)
    opens with one of :data:`FAQ_TEXTS` instead (user ``u`` with number
    ``u // faq_every`` of them, in turn), a message that needs no tool (even where the
    first message would have asked for a Zapier action). The first user to
    ask a question sends it at once; the others who open with it arrive later, once that
    first one has its answer (identical requests sent at the same moment would all miss a
    cache: an answer is stored when it comes back). Counted in ``faq`` and ``faq_repeats``.

    With ``large_every``, message ``m`` of user ``u`` asks for an answer
    :data:`LARGE_KEYWORD` when ``(u + m) % large_every == 0`` and it is not a tool message
    (nor a common question). Counted in ``large_messages``.
    """
    rng = random.Random(seed)
    result = LoadResult(started=time.monotonic())
    dead: dict[str, float] = {}
    replica = itertools.cycle(targets)
    others_done = asyncio.Event()
    extra = noisy_in_flight if noisy else 0
    connections = users + extra + batch_workers + 10
    limits = httpx2.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx2.AsyncClient(timeout=timeout, limits=limits) as client:

        async def send(out: LoadResult, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
            """POST ``body``, to another replica if one is down; the answer, or None."""
            out.sent += 1
            began = time.monotonic()
            response = None
            last = "no replica up"
            for _ in range(len(targets) + 1):
                target = next(replica)
                if dead.get(target, 0) > time.monotonic():
                    continue
                try:
                    response = await client.post(f"{target}{path}", json=body)
                    break
                except httpx2.HTTPError as exc:
                    # Like a load balancer: a replica that is down gets no traffic for
                    # a while, and the message goes to another one.
                    dead[target] = time.monotonic() + 5.0
                    out.resent += 1
                    last = type(exc).__name__
                except asyncio.CancelledError:
                    out.cut_off += 1  # the load stopped (``duration``) before the answer
                    raise
            if response is None:
                out.errors[last] = out.errors.get(last, 0) + 1
                return None
            if response.status_code != 200:
                key = f"HTTP {response.status_code}"
                out.errors[key] = out.errors.get(key, 0) + 1
                return None
            answer: dict[str, Any] = response.json()
            out.answered += 1
            out.latencies.append(time.monotonic() - began)
            out.waits.append(float(answer.get("limiter_wait", 0.0)))
            if LARGE_KEYWORD in str(body.get("text", "")):
                out.large_messages += 1
            calls = len(answer.get("tool_calls", []))
            out.tool_calls += calls
            out.tool_messages += 1 if calls else 0
            return answer

        def text_of(name: str, u: int, m: int) -> str:
            if tool_every and (u + m) % tool_every == tool_every - 1:
                return f"{TOOL_TEXTS[(u + m) % len(TOOL_TEXTS)]} (message {m})"
            if large_every and (u + m) % large_every == 0:
                return (
                    f"Hello, this is {name}, message {m}: please explain your opening hours "
                    f"{LARGE_KEYWORD}."
                )
            return f"Hello, this is {name}, message {m}: what are your opening hours?"

        def faq_of(u: int) -> int | None:
            """The number of the question user ``u`` opens with, or None."""
            if faq_every <= 0 or u % faq_every:
                return None
            return (u // faq_every) % len(FAQ_TEXTS)

        # Per question: the first user to ask it, and when (and whether) it was answered.
        first_asker: dict[int, int] = {}
        for u in range(users):
            q = faq_of(u)
            if q is not None:
                first_asker.setdefault(q, u)
        first_answered = {q: asyncio.Event() for q in first_asker}
        first_ok: dict[int, bool] = {}

        async def opening(u: int, body: dict[str, Any]) -> dict[str, Any] | None:
            """Send user ``u``'s first message; a question many ask, after the first to ask
            it has its answer."""
            q = faq_of(u)
            if q is None:
                return await send(result, "/messages", body)
            body["text"] = FAQ_TEXTS[q]
            result.faq += 1
            if first_asker[q] != u:
                await first_answered[q].wait()
                result.faq_repeats += 1 if first_ok[q] else 0
                return await send(result, "/messages", body)
            first_ok[q] = False
            try:
                answer = await send(result, "/messages", body)
                first_ok[q] = answer is not None
                return answer
            finally:
                first_answered[q].set()

        async def user(u: int) -> None:
            name = f"user-{u:03d}"
            result.order[name] = []
            await asyncio.sleep(rng.random() * 0.2)
            for m in range(messages):
                body = {"user_id": name, "text": text_of(name, u, m), "images": []}
                answer = await (opening(u, body) if m == 0 else send(result, "/messages", body))
                if answer is not None:
                    result.order[name].append(m)
                if progress is not None:
                    progress(result)

        async def noisy_user(out: LoadResult) -> None:
            numbers = iter(range(out.planned))

            async def sender() -> None:
                for m in numbers:
                    if others_done.is_set():
                        return
                    body = {"user_id": NOISY_USER, "text": text_of(NOISY_USER, users, m)}
                    if await send(out, "/messages", body) is not None:
                        out.order.setdefault(NOISY_USER, []).append(m)

            await asyncio.gather(*(sender() for _ in range(noisy_in_flight)))

        async def batch_job(out: LoadResult) -> None:
            numbers = itertools.count()

            async def worker() -> None:
                for n in numbers:
                    if others_done.is_set():
                        return
                    text = f"Summarise conversation {n} of the nightly export in one line"
                    await send(out, "/batch", {"job": BATCH_JOB, "text": text})

            await asyncio.gather(*(worker() for _ in range(batch_workers)))

        background = []
        if noisy:
            result.noisy = LoadResult(started=result.started, planned=noisy * messages)
            background.append(noisy_user(result.noisy))
        if batch_workers:
            result.batch = LoadResult(started=result.started)
            background.append(batch_job(result.batch))

        async def others() -> None:
            try:
                tasks = [asyncio.create_task(user(u)) for u in range(users)]
                if duration is None:
                    await asyncio.gather(*tasks)
                else:
                    _, late = await asyncio.wait(tasks, timeout=duration)
                    for task in late:
                        task.cancel()
                    await asyncio.gather(*late, return_exceptions=True)
                    for task in tasks:
                        if not task.cancelled():
                            task.result()  # a user's own error, if any
            finally:
                result.finished = time.monotonic()
                others_done.set()

        await asyncio.gather(others(), *background)
    for extra_result in (result.noisy, result.batch):
        if extra_result is not None:
            extra_result.finished = time.monotonic()
    return result
