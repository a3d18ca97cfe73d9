"""The agent speaks systemd's notify protocol (what Type=notify and NotifyAccess=main rely on):
a test socket stands in for systemd's as NOTIFY_SOCKET, in a one-node lab with a real etcd."""

from __future__ import annotations

import ipaddress
import json
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.lab import Lab

from .cluster import PREFIX, Cluster, need_lab, wait_until

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}


@dataclass
class Datagram:
    lines: list[str]
    pid: int  # the sender, from SCM_CREDENTIALS: systemd checks it against the main PID
    subnet_env_existed: bool  # when the datagram arrived


class NotifySocket:
    """An AF_UNIX datagram socket like systemd's; a thread records every datagram."""

    def __init__(self, path: Path, subnet_file: Path) -> None:
        self.path = path
        self.subnet_file = subnet_file
        self.received: list[Datagram] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        creds = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds))
            except TimeoutError:
                continue
            existed = self.subnet_file.exists()
            pid = next(
                struct.unpack("3i", d[:creds])[0]
                for level, kind, d in ancdata
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
            )
            self.received.append(Datagram(data.decode().split("\n"), pid, existed))

    def wait_for(self, pred: Callable[[str], bool], timeout: float, what: str) -> Datagram:
        def found() -> Datagram | None:
            return next((d for d in self.received if any(pred(x) for x in d.lines)), None)

        return wait_until(found, timeout, step=0.05, what=what)

    def lines(self) -> list[str]:
        return [line for d in self.received for line in d.lines]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def status(cluster: Cluster, node) -> dict | None:
    """The agent's `flannelctl status --json`, or None while its socket does not answer."""
    try:
        return cluster.status(node)
    except ValueError:  # no JSON: flannelctl could not reach the socket yet
        return None


@pytest.fixture
def setup() -> Iterator[tuple[Lab, Cluster, NotifySocket]]:
    need_lab()
    with Lab(nodes=1, containers=0) as lab:
        lab.start_etcd()
        cluster = Cluster(lab, CONFIG)
        node = lab.nodes[0]
        (lab.workdir / node.name).mkdir()
        listener = NotifySocket(lab.workdir / "notify.sock", cluster.subnet_file(node))
        try:
            yield lab, cluster, listener
        finally:
            listener.close()


def test_ready_after_subnet_env_status_on_changes_stopping_on_sigterm(setup):
    lab, cluster, listener = setup
    node = lab.nodes[0]
    lab.etcdctl("del", f"{PREFIX}/config")  # hold the agent before readiness
    proc = cluster.start(node, "--reconcile-interval=1", env={"NOTIFY_SOCKET": str(listener.path)})

    waiting = wait_until(lambda: status(cluster, node), 10, what="the agent's status socket")
    time.sleep(2.5)  # the agent polls the config every second: two more polls
    assert proc.poll() is None
    assert (waiting["ready"], waiting["lease"]) == (False, None)
    assert status(cluster, node)["ready"] is False
    assert not any(line.startswith("READY=") for line in listener.lines())
    assert not cluster.subnet_file(node).exists()

    cluster.put_config()
    ready = listener.wait_for(lambda x: x == "READY=1", 15, "READY=1")
    assert ready.subnet_env_existed, "READY=1 arrived before subnet.env was written"
    assert ready.pid == proc.pid  # NotifyAccess=main accepts it
    subnet = ipaddress.ip_interface(cluster.env(node)["FLANNEL_SUBNET"]).network
    assert f"STATUS=subnet {subnet}, backend host-gw" in ready.lines

    # a peer appears and goes: a STATUS line for each
    peer = next(s for s in ipaddress.ip_network("10.244.0.0/16").subnets(8) if s != subnet)
    key = f"{PREFIX}/subnets/{peer.network_address}-{peer.prefixlen}"
    record = {"PublicIP": "192.0.2.99", "PublicIPv6": None, "BackendType": "host-gw"}
    lab.etcdctl("put", key, json.dumps(record))
    one = listener.wait_for(lambda x: x.startswith("STATUS=") and "1 peers" in x, 10, "1 peer")
    lab.etcdctl("del", key)
    after = listener.received.index(one) + 1
    wait_until(
        lambda: any("0 peers" in x for d in listener.received[after:] for x in d.lines),
        10,
        what="STATUS with 0 peers after the peer left",
    )
    # STATUS follows the passes (one a second here) but says only news: nothing changes now
    quiet_from = len(listener.received)
    time.sleep(2.5)
    assert not [x for d in listener.received[quiet_from:] for x in d.lines if "STATUS=" in x]

    proc.send_signal(signal.SIGTERM)  # the python process itself: `ip netns exec` execs it
    assert proc.wait(5) == 0
    stopping = listener.wait_for(lambda x: x == "STOPPING=1", 2, "STOPPING=1")
    assert stopping.pid == proc.pid
    assert listener.received[-1] is stopping, listener.lines()
    assert sum(line == "READY=1" for line in listener.lines()) == 1
