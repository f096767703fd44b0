"""A TCP proxy on loopback that a test can cut and heal: Redis "unreachable" on demand.

While cut, it accepts each connection and closes it at once (the client sees the
connection closed, as with a dead or partitioned server) and counts those attempts, so a
test can tell how hard a client hammers a Redis that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self

__all__ = ["Proxy"]


class Proxy:
    """``async with Proxy(redis_port) as proxy:``; ``proxy.port`` is where clients connect."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cut_attempts = 0
        self._cut = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        """From now on, every connection (open or new) is closed at once."""
        self._cut = True
        self.cut_attempts = 0
        self._drop_all()

    def heal(self) -> None:
        self._cut = False

    def _drop_all(self) -> None:
        for writer in list(self._pipes):
            writer.close()
        self._pipes.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.cut_attempts += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._pipes.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()
            self._pipes.discard(dst)
            with contextlib.suppress(Exception):
                await dst.wait_closed()
