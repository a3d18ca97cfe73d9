"""A 3-member etcd cluster: killing the member the agent talks to (the leader) moves the agent
to another member within 5 s, and the peer watch loses no event."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from deploy.lab import _etcd_tool
from flanneld.agent.watcher import PeerWatcher
from flanneld.core.lease import LeaseAttrs
from flanneld.edges.registry import EtcdRegistry

from ..conftest import _free_port


class EtcdCluster:
    def __init__(self, n: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="flanneld-etcd3-")
        self.names = [f"m{i}" for i in range(n)]
        self.client = {m: f"http://127.0.0.1:{_free_port()}" for m in self.names}
        self.peer = {m: f"http://127.0.0.1:{_free_port()}" for m in self.names}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        initial = ",".join(f"{m}={self.peer[m]}" for m in self.names)
        for m in self.names:
            log = open(f"{self.dir}/{m}.log", "ab")  # noqa: SIM115 - owned by the process
            self.procs[m] = subprocess.Popen(
                [
                    _etcd_tool("etcd"),
                    "--name",
                    m,
                    "--data-dir",
                    f"{self.dir}/{m}",
                    "--unsafe-no-fsync",
                    "--listen-client-urls",
                    self.client[m],
                    "--advertise-client-urls",
                    self.client[m],
                    "--listen-peer-urls",
                    self.peer[m],
                    "--initial-advertise-peer-urls",
                    self.peer[m],
                    "--initial-cluster",
                    initial,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    self.dir,
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.leader() is not None:
                return
            time.sleep(0.2)
        raise RuntimeError(f"etcd cluster did not elect a leader; see {self.dir}")

    def ctl(self, *args: str, endpoints: list[str] | None = None) -> str:
        eps = ",".join(endpoints or list(self.client.values()))
        return subprocess.run(
            [_etcd_tool("etcdctl"), f"--endpoints={eps}", "--dial-timeout=1s", *args],
            capture_output=True,
            text=True,
            timeout=15,
        ).stdout

    def leader(self) -> str | None:
        try:
            status = json.loads(self.ctl("endpoint", "status", "-w", "json") or "[]")
        except ValueError:
            return None
        for st in status:
            if st["Status"]["leader"] == st["Status"]["header"]["member_id"]:
                return next(m for m in self.names if self.client[m] == st["Endpoint"])
        return None

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        subprocess.run(["rm", "-rf", self.dir], check=False)


@pytest.fixture
def cluster():
    c = EtcdCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


async def test_killing_the_leader_the_agent_uses_fails_over_without_losing_events(cluster):
    leader = cluster.leader()
    others = [m for m in cluster.names if m != leader]
    endpoints = [cluster.client[leader]] + [cluster.client[m] for m in others]
    reg = EtcdRegistry(endpoints, "/fo/network")
    seen: list = []
    watcher = PeerWatcher(reg, seen.extend)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        assert reg.endpoint.port == int(cluster.client[leader].rsplit(":", 1)[1])
        nets = [IPv4Network(f"10.8.{i}.0/24") for i in range(1, 7)]
        attrs = LeaseAttrs(IPv4Address("192.0.2.5"), "host-gw").encode().decode()

        def put(i: int) -> None:  # retried while the surviving members elect a new leader
            deadline = time.monotonic() + 10
            while "OK" not in cluster.ctl(
                "put",
                f"/fo/network/subnets/10.8.{i}.0-24",
                attrs,
                endpoints=[cluster.client[m] for m in others],
            ):
                assert time.monotonic() < deadline, "the surviving members never took the put"
                time.sleep(0.1)

        put(1)
        leader_port = int(cluster.client[leader].rsplit(":", 1)[1])
        cluster.procs[leader].send_signal(signal.SIGKILL)
        cluster.procs[leader].wait()
        t0 = time.monotonic()
        # written while the agent is moving to another member (in a thread: the loop runs on)
        writer = asyncio.create_task(asyncio.to_thread(lambda: [put(i) for i in range(2, 7)]))
        moved_after = None
        while {ch.subnet for ch in seen} != set(nets) or not writer.done():
            if moved_after is None and reg.endpoint.port != leader_port:
                moved_after = time.monotonic() - t0
            assert time.monotonic() - t0 < 15, f"saw only {sorted({c.subnet for c in seen})}"
            await asyncio.sleep(0.05)
        await writer
        assert moved_after is not None and moved_after < 5, f"moved after {moved_after} s"
        assert reg.endpoint.port != int(cluster.client[leader].rsplit(":", 1)[1])
        assert await reg.get_config() is None  # plain requests work on the new member too
    finally:
        task.cancel()
        await reg.close()
    assert set(watcher.table.leases) == set(nets)
