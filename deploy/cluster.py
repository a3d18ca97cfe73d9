"""The agent on every node of a lab: what the demo, the benchmark and the e2e tests share.

`Cluster` writes the network config into the lab's etcd, starts `flanneld` in each node
namespace (own subnet file, state dir and log), waits for its subnet.env and puts the node's
containers on a cni0 bridge with FLANNEL_SUBNET, as the CNI plugin would.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from flanneld.core.options import SOCKET_NAME
from flanneld.edges import subnetenv
from flanneld.face.ctl import CtlError, fetch_status

from .lab import Lab, LabError, Node, signal_group

PREFIX = "/coreos.com/network"

T = TypeVar("T")


class AgentExited(RuntimeError):
    """An agent ended while the cluster waited for it; the message holds its log's tail."""


def wait_until(
    pred: Callable[[], T], timeout: float, step: float = 0.1, what: str = "condition"
) -> T:
    """Call `pred` every `step` s until it returns something true, and return that; raise
    TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class Cluster:
    def __init__(self, lab: Lab, config: dict, extra_args: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.config = config
        self.extra_args = extra_args
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.put_config()

    def put_config(self) -> None:
        """Write `config` to `<prefix>/config` in the lab's etcd."""
        self.lab.etcdctl("put", f"{PREFIX}/config", json.dumps(self.config))

    def state_dir(self, node: Node) -> Path:
        """The agent's --state-dir on `node`: its status socket lives there."""
        return self.lab.workdir / node.name

    def subnet_file(self, node: Node) -> Path:
        return self.state_dir(node) / "subnet.env"

    def start(
        self, node: Node, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start the agent on `node` with the cluster's flags plus `args`; `env` is added to
        its environment."""
        (self.lab.workdir / node.name).mkdir(exist_ok=True)
        proc = self.lab.spawn(
            node.ns,
            sys.executable,
            "-m",
            "flanneld",
            f"--etcd-endpoints={self.lab.etcd_endpoint}",
            f"--subnet-file={self.subnet_file(node)}",
            f"--state-dir={self.state_dir(node)}",
            f"--iface={node.iface}",
            *self.extra_args,
            *args,
            log=self.lab.workdir / f"{node.name}.agent.log",
            env=env,
        )
        self.procs[node.name] = proc
        return proc

    def stop(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 5) -> float:
        """Stop a node's agent; returns how long it took to exit."""
        proc = self.procs.pop(node.name)
        t0 = time.monotonic()
        signal_group(proc, sig)
        proc.wait(timeout)
        return time.monotonic() - t0

    def env(self, node: Node) -> dict[str, str]:
        path = self.subnet_file(node)
        return subnetenv.parse(path.read_text()) if path.exists() else {}

    def wait_ready(self, node: Node, timeout: float = 20) -> dict[str, str]:
        """Wait for the node's subnet.env, attach its containers to cni0 (FLANNEL_SUBNET and
        FLANNEL_IPV6_SUBNET, whichever the agent wrote); the subnet.env."""
        proc = self.procs[node.name]

        def ready() -> dict[str, str]:
            if proc.poll() is not None:
                raise AgentExited(
                    f"agent on {node.name} exited with status {proc.returncode}\n"
                    f"--- its log ends:\n{self.log(node)[-2000:]}"
                )
            return self.env(node)

        env = wait_until(ready, timeout, what=f"subnet.env of {node.name}")
        self.lab.attach_containers(
            node,
            env.get("FLANNEL_SUBNET") or None,
            mtu=int(env["FLANNEL_MTU"]),
            subnet6_cidr=env.get("FLANNEL_IPV6_SUBNET") or None,
        )
        return env

    def start_all(self, *args: str) -> None:
        for node in self.lab.nodes:
            self.start(node, *args)
        for node in self.lab.nodes:
            self.wait_ready(node)

    def log(self, node: Node) -> str:
        path = self.lab.workdir / f"{node.name}.agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def http_get(self, node: Node, path: str, port: int) -> tuple[int, str]:
        """GET http://127.0.0.1:<port><path> inside the node (the agent's health server):
        status and body."""
        probe = (
            "import sys, urllib.request as u, urllib.error as e\n"
            "try: r = u.urlopen(sys.argv[1], timeout=5)\n"
            "except e.HTTPError as x: r = x\n"
            'print(r.status); print(r.read().decode(), end="")'
        )
        url = f"http://127.0.0.1:{port}{path}"
        out = self.lab.run(node.ns, sys.executable, "-c", probe, url).stdout
        status, _, body = out.partition("\n")
        return int(status), body

    def status(self, node: Node) -> dict:
        """What `flannelctl status --json --state-dir DIR` prints for the agent on `node`: its
        lease, its peers and their datapath health (asked on its unix socket)."""
        try:
            return fetch_status(str(self.state_dir(node)))
        except CtlError as e:
            raise LabError(f"the status of the agent on {node.name}: {e}") from None

    def metric_samples(self, node: Node) -> dict[str, float]:
        """The agent's /metrics, asked on its unix socket: each sample's value by its series
        as the exposition spells it, e.g. `flannel_peers` or
        `flannel_reconcile_runs_total{mode="full"}`."""
        path = self.state_dir(node) / SOCKET_NAME
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(path))
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError as e:
            raise LabError(f"the metrics of the agent on {node.name} ({path}): {e}") from None
        head, _, body = data.partition(b"\r\n\r\n")
        first = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if first.split(" ")[1:2] != ["200"]:
            raise LabError(f"the agent on {node.name} answered {first!r} for /metrics")
        samples = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                samples[series] = float(value)
        return samples

    def routes(self, node: Node) -> list[dict]:
        out = self.lab.run(node.ns, "ip", "-j", "route", "show", "table", "main").stdout
        return json.loads(out)

    def wait_reachable(self, timeout: float, family: int = 4) -> dict[tuple[str, str], bool]:
        """Repeat the lab's ping matrix (of IPv4 addresses, or IPv6 ones with `family=6`)
        until every pair answers or `timeout` s passed; the last matrix."""
        deadline = time.monotonic() + timeout
        while True:
            matrix = self.lab.ping_matrix(family)
            if all(matrix.values()) or time.monotonic() > deadline:
                return matrix
            time.sleep(0.5)
