"""A throwaway Redis Cluster: 3 masters and 3 replicas, 6 ``redis-server`` processes.

Each node is a :class:`limiter.testing.RedisServer` on a free loopback port with
``cluster-enabled yes``; the fixture assigns the 16384 slots itself (a third to each
master), introduces the nodes with CLUSTER MEET, attaches one replica to each master, and
waits until every node reports ``cluster_state:ok`` and knows all six. Works with Redis
6.2 (bus port = port + 10000, so both must be free) and 7.x.
"""

from __future__ import annotations

import socket
import time
from types import TracebackType
from typing import Self

import redis

from limiter.testing import RedisServer, free_port

__all__ = ["RedisClusterNodes"]

SLOTS = 16384


def _port_with_free_bus() -> int:
    """A free port whose cluster-bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) on 127.0.0.1")


class RedisClusterNodes:
    """Start with ``with RedisClusterNodes() as cluster:``; ``cluster.url`` is a startup node."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 1) -> None:
        self.masters: list[RedisServer] = []
        self.replicas: list[RedisServer] = []
        self._n_masters = masters
        self._n_replicas = replicas_per_master
        #: slot ranges (first, last) of each master, in order.
        self.ranges: list[tuple[int, int]] = []

    @property
    def nodes(self) -> list[RedisServer]:
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL naming every master (any one would do)."""
        hosts = ",".join(f"127.0.0.1:{m.port}" for m in self.masters)
        return f"redis+cluster://{hosts}"

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=5)

    def master_of_slot(self, slot: int) -> RedisServer:
        for server, (first, last) in zip(self.masters, self.ranges, strict=True):
            if first <= slot <= last:
                return server
        raise ValueError(f"slot {slot} is not assigned")

    def start(self, within: float = 30.0) -> Self:
        try:
            self._start(within)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, within: float) -> None:
        total = self._n_masters * (1 + self._n_replicas)
        for i in range(total):
            server = RedisServer(
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
                port=_port_with_free_bus(),
            )  # fmt: skip
            server.start()
            (self.masters if i < self._n_masters else self.replicas).append(server)
        ids = {}
        for server in self.nodes:
            with self.client(server) as c:
                ids[server.port] = c.execute_command("CLUSTER MYID").decode()
        step = SLOTS // self._n_masters
        for i, server in enumerate(self.masters):
            first = i * step
            last = SLOTS - 1 if i == self._n_masters - 1 else (i + 1) * step - 1
            self.ranges.append((first, last))
            with self.client(server) as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
        with self.client(self.masters[0]) as c:
            for server in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", server.port)
        deadline = time.monotonic() + within
        self._until(deadline, "every node knows all nodes", self._all_known)
        for i, replica in enumerate(self.replicas):
            master = self.masters[i % self._n_masters]
            with self.client(replica) as c:
                c.execute_command("CLUSTER REPLICATE", ids[master.port])
        self._until(deadline, "cluster_state:ok with replicas in sync", self._healthy)

    def _all_known(self) -> bool:
        want = len(self.nodes)
        for server in self.nodes:
            with self.client(server) as c:
                nodes = c.cluster("nodes")  # redis-py parses it: {address: {"flags": ...}}
            if len(nodes) != want or any("handshake" in n["flags"] for n in nodes.values()):
                return False
        return True

    def _healthy(self) -> bool:
        for server in self.nodes:
            with self.client(server) as c:
                if c.cluster("info")["cluster_state"] != "ok":
                    return False
        for server in self.masters:
            with self.client(server) as c:
                info = c.info("replication")
                if int(info.get("connected_slaves", 0)) < self._n_replicas:
                    return False
        for server in self.replicas:
            with self.client(server) as c:
                if c.info("replication").get("master_link_status") != "up":
                    return False
        return True

    @staticmethod
    def _until(deadline: float, what: str, check: object) -> None:
        assert callable(check)
        while not check():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test cluster never reached: {what}")
            time.sleep(0.05)

    def flush(self) -> None:
        """Empty every master (replicas follow) and every node's script cache."""
        for server in self.masters:
            with self.client(server) as c:
                c.flushall()
        for server in self.nodes:
            with self.client(server) as c:
                c.script_flush()

    def stop(self) -> None:
        for server in self.nodes:
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
