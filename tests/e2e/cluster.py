"""The e2e tests' common ground: `deploy.cluster` (the agent on every lab node) plus the
assertions, the state readers (metrics, `flannelctl status`, etcd records, routes) and the root
check the tests share."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from ipaddress import ip_interface

import pytest

from deploy import cluster
from deploy.cluster import PREFIX, wait_until
from deploy.lab import Lab, Node

__all__ = [
    "PREFIX",
    "Cluster",
    "as_found",
    "need_lab",
    "ours",
    "running",
    "sample",
    "wait_until",
]

ROUTE_PROTOCOL = 155  # the agent's routes; iproute2's JSON gives the number as a string


def ours(route: dict) -> bool:
    """A route the agent owns (protocol 155), as `ip -j route` lists it ("155", or 155)."""
    return str(route.get("protocol")) == str(ROUTE_PROTOCOL)


def need_lab() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to build the network-namespace lab")


def sample(text: str, name: str, **labels: str) -> float:
    """The value of metric `name` with `labels` in a Prometheus exposition; 0 when absent
    (a counter that never moved has no sample)."""
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.split("{")[0] == name and all(f'{k}="{v}"' in metric for k, v in labels.items()):
            return float(value)
    return 0.0


class Cluster(cluster.Cluster):
    def assert_all_reachable(self, timeout: float = 10) -> None:
        matrix = self.wait_reachable(timeout)
        failed = [pair for pair, ok in matrix.items() if not ok]
        if failed:
            logs = "\n".join(f"--- {n.name}\n{self.log(n)[-1500:]}" for n in self.lab.nodes)
            raise AssertionError(f"unreachable: {failed}\n{logs}")

    # -- state, as an operator or a test reads it ------------------------------------------
    def subnet(self, node: Node) -> str:
        """The node's lease subnet (from its subnet.env), e.g. 10.244.3.0/24."""
        return str(ip_interface(self.env(node)["FLANNEL_SUBNET"]).network)

    def lease_key(self, subnet: str) -> str:
        return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"

    def lease_kv(self, subnet: str) -> dict | None:
        """The etcd key-value of a lease (`lease`: the etcd lease ID, `create_revision`...), or
        None when there is no such key."""
        doc = json.loads(self.lab.etcdctl("get", "-w", "json", self.lease_key(subnet)))
        return doc.get("kvs", [None])[0]

    def status(self, node: Node) -> dict:
        """`flannelctl status --json` of the node's agent (its status socket); ValueError
        when it gives no status (the socket does not answer)."""
        res = self.lab.run(
            node.ns,
            sys.executable,
            "-m",
            "flanneld.face.ctl",
            "status",
            "--json",
            "--state-dir",
            str(self.lab.workdir / node.name),
            check=False,
        )
        try:
            return json.loads(res.stdout)
        except ValueError:
            raise ValueError(f"no status from {node.name}: {res.stderr.strip()}") from None

    def wait_serving(self, node: Node, timeout: float = 20) -> dict:
        """Wait until the node's agent process (the one started last) says it is ready on its
        status socket: after a restart, subnet.env is still the old agent's, so `wait_ready`
        alone does not tell that the new one got through its first reconcile. Its status."""
        proc = self.procs[node.name]

        def ready() -> dict | None:
            if proc.poll() is not None:
                raise cluster.AgentExited(f"agent on {node.name} exited\n{self.log(node)[-2000:]}")
            try:
                doc = self.status(node)
            except ValueError:  # no JSON: the socket does not answer yet
                return None
            return doc if doc["ready"] else None

        try:
            return wait_until(ready, timeout, what=f"the agent on {node.name} to be ready")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- its log ends:\n{self.log(node)[-3000:]}") from None

    def metrics(self, node: Node, port: int) -> str:
        """The agent's /metrics page (needs --healthz-port=`port`)."""
        status, body = self.http_get(node, "/metrics", port)
        assert status == 200, (status, body)
        return body

    def running_nodes(self) -> set[str]:
        return {name for name, proc in self.procs.items() if proc.poll() is None}

    # -- putting a shared cluster back as a test found it ---------------------------------
    def leave(self, node: Node) -> None:
        """Take `node` out of the cluster for good: its agent stopped, its lease deleted, its
        containers detached, its routes, device and subnet.env gone; wait until the running
        nodes dropped its routes."""
        subnet = self.subnet(node) if self.env(node) else None
        if node.name in self.procs:
            with contextlib.suppress(Exception):
                self.stop(node)
        if subnet:
            self.lab.etcdctl("del", self.lease_key(subnet))
        self.lab._detach_containers(node)  # noqa: SLF001 - the lab has no public detach
        self.lab.run(node.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup", check=False)
        self.subnet_file(node).unlink(missing_ok=True)
        if subnet:
            for other in self.lab.nodes:
                if other.name in self.running_nodes():
                    wait_until(
                        lambda o=other: subnet not in {r["dst"] for r in self.routes(o)},
                        10,
                        what=f"{other.name} to drop {node.name}'s route {subnet}",
                    )

    def restore(self, names: Iterable[str]) -> None:
        """Exactly the agents `names` running and ready (started again where one was stopped
        or died), every other node out of the cluster (`leave`)."""
        wanted = set(names)
        for node in self.lab.nodes:
            proc = self.procs.get(node.name)
            if node.name not in wanted:
                if proc is not None or self.env(node) or node.containers:
                    self.leave(node)
            elif proc is None or proc.poll() is not None:
                self.procs.pop(node.name, None)
                self.start(node)
        for node in self.lab.nodes:
            if node.name in wanted:
                self.wait_ready(node)
                self.wait_serving(node)


@contextlib.contextmanager
def running(
    config: dict, args: tuple[str, ...] = (), nodes: int = 3, start: int | None = None, **lab_kw
) -> Iterator[Cluster]:
    """A lab with etcd, `config` written, and the agent ready on its first `start` nodes (all
    by default), containers attached: the module fixture of most e2e files."""
    need_lab()
    with Lab(nodes=nodes, **lab_kw) as lab:
        lab.start_etcd()
        c = Cluster(lab, config, args)
        for node in lab.nodes[:start]:
            c.start(node)
        for node in lab.nodes[:start]:
            c.wait_ready(node)
        yield c


@contextlib.contextmanager
def as_found(c: Cluster) -> Iterator[None]:
    """Around one test on a shared (module) cluster: afterwards, also when the test failed,
    the same agents run with the same subnets and every node answers every other, so no test
    depends on what an earlier one did. A test that changed a node's subnet fails here."""
    names = c.running_nodes()
    subnets = {n.name: c.subnet(n) for n in c.lab.nodes if n.name in names}
    try:
        yield
    finally:
        c.restore(names)
    after = {n.name: c.subnet(n) for n in c.lab.nodes if n.name in names}
    assert after == subnets, f"a test left other subnets behind: {subnets} -> {after}"
    c.assert_all_reachable(timeout=15)
