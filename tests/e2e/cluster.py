"""A lab with the agent running on every node: the e2e tests' common ground.

`Cluster` writes the network config into the lab's etcd, starts `flanneld` in each node
namespace (own subnet file, state dir and log), waits for its subnet.env and puts the node's
containers on a cni0 bridge with FLANNEL_SUBNET, as the CNI plugin would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.lab import Lab, Node
from flanneld import subnetenv

PREFIX = "/coreos.com/network"


def need_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to build the network-namespace lab")


def wait_until(pred, timeout: float, step: float = 0.1, what: str = "condition"):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class Cluster:
    def __init__(self, lab: Lab, config: dict, extra_args: tuple[str, ...] = ()) -> None:
        self.lab = lab
        self.config = config
        self.extra_args = extra_args
        self.procs: dict[str, subprocess.Popen] = {}
        lab.etcdctl("put", f"{PREFIX}/config", json.dumps(config))

    def subnet_file(self, node: Node) -> Path:
        return self.lab.workdir / node.name / "subnet.env"

    def start(self, node: Node, *args: str) -> subprocess.Popen:
        (self.lab.workdir / node.name).mkdir(exist_ok=True)
        proc = self.lab.spawn(
            node.ns,
            sys.executable,
            "-m",
            "flanneld",
            f"--etcd-endpoints={self.lab.etcd_endpoint}",
            f"--subnet-file={self.subnet_file(node)}",
            f"--state-dir={self.lab.workdir / node.name}",
            f"--iface={node.iface}",
            *self.extra_args,
            *args,
            log=self.lab.workdir / f"{node.name}.agent.log",
        )
        self.procs[node.name] = proc
        return proc

    def stop(self, node: Node, sig: int = signal.SIGTERM, timeout: float = 5) -> float:
        """Stop a node's agent; returns how long it took to exit."""
        proc = self.procs.pop(node.name)
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
        return time.monotonic() - t0

    def env(self, node: Node) -> dict[str, str]:
        path = self.subnet_file(node)
        return subnetenv.parse(path.read_text()) if path.exists() else {}

    def wait_ready(self, node: Node, timeout: float = 20) -> dict[str, str]:
        proc = self.procs[node.name]

        def ready() -> dict[str, str]:
            if proc.poll() is not None:
                raise AssertionError(f"agent on {node.name} exited: {self.log(node)[-2000:]}")
            return self.env(node)

        env = wait_until(ready, timeout, what=f"subnet.env of {node.name}")
        self.lab.attach_containers(node, env["FLANNEL_SUBNET"], mtu=int(env["FLANNEL_MTU"]))
        return env

    def start_all(self, *args: str) -> None:
        for node in self.lab.nodes:
            self.start(node, *args)
        for node in self.lab.nodes:
            self.wait_ready(node)

    def log(self, node: Node) -> str:
        path = self.lab.workdir / f"{node.name}.agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def routes(self, node: Node) -> list[dict]:
        out = self.lab.run(node.ns, "ip", "-j", "route", "show", "table", "main").stdout
        return json.loads(out)

    def all_reachable(self) -> bool:
        return all(self.lab.ping_matrix().values())

    def assert_all_reachable(self, timeout: float = 10) -> None:
        def ok() -> bool:
            matrix = self.lab.ping_matrix()
            self.last_matrix = matrix
            return all(matrix.values())

        try:
            wait_until(ok, timeout, step=0.5, what="all containers to reach each other")
        except AssertionError:
            failed = [k for k, v in self.last_matrix.items() if not v]
            logs = "\n".join(f"--- {n.name}\n{self.log(n)[-1500:]}" for n in self.lab.nodes)
            raise AssertionError(f"unreachable: {failed}\n{logs}") from None
