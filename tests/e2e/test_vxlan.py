"""vxlan end to end: real agents, etcd and packets in the namespace lab. Three nodes, a fourth
joining, a node leaving, the device deleted by hand, a restart; then DirectRouting with one node
behind the lab's router.

The four-node lab is shared by the module (three agents running, the fourth node spare);
`as_found` puts it back after every test, so each test finds n1..n3 ready and n4 out of the
cluster, whatever ran before it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deploy.lab import Lab, Node

from .cluster import Cluster, as_found, need_lab, ours, running, sample, wait_until

DEV = "flannel.1"
CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
RECONCILE = 2.0
PORT = 8471
ARGS = (f"--reconcile-interval={RECONCILE:g}", "--healthz-ip=127.0.0.1", f"--healthz-port={PORT}")


@pytest.fixture(scope="module")
def shared():
    with running(CONFIG, ARGS, nodes=4, start=3) as c:
        yield c


@pytest.fixture
def cluster(shared):
    with as_found(shared):
        yield shared


def subnet(c: Cluster, node: Node) -> str:
    return c.subnet(node)


def record(c: Cluster, node: Node) -> dict:
    return json.loads(c.lab.etcdctl("get", "--print-value-only", c.lease_key(subnet(c, node))))


def device(c: Cluster, node: Node) -> tuple[int, str]:
    """(ifindex, MAC) of the node's VXLAN device."""
    [link] = json.loads(c.lab.run(node.ns, "ip", "-j", "link", "show", "dev", DEV).stdout)
    return link["ifindex"], link["address"]


def device_details(c: Cluster, node: Node) -> tuple[int, str, int, int]:
    """(ifindex, MAC, MTU, VNI) of the node's VXLAN device."""
    [link] = json.loads(c.lab.run(node.ns, "ip", "-d", "-j", "link", "show", "dev", DEV).stdout)
    return link["ifindex"], link["address"], link["mtu"], link["linkinfo"]["info_data"]["id"]


def fdb(c: Cluster, node: Node) -> dict[str, str]:
    out = c.lab.run(node.ns, "bridge", "-j", "fdb", "show", "dev", DEV, check=False).stdout
    return {e["mac"]: e["dst"] for e in json.loads(out or "[]") if "dst" in e}


def arp(c: Cluster, node: Node) -> dict[str, str]:
    out = c.lab.run(node.ns, "ip", "-j", "neigh", "show", "dev", DEV, check=False).stdout
    return {e["dst"]: e.get("lladdr") for e in json.loads(out or "[]")}


def our_routes(c: Cluster, node: Node) -> dict[str, tuple[str, str, list[str]]]:
    """dst → (gateway, dev, flags) of the agent's routes (proto 155)."""
    return {
        r["dst"]: (r.get("gateway"), r["dev"], r.get("flags", []))
        for r in c.routes(node)
        if ours(r)
    }


def kernel_state(c: Cluster, node: Node) -> tuple:
    """Everything the agent programs on `node`: device, FDB, ARP and its routes."""
    return device_details(c, node), fdb(c, node), arp(c, node), our_routes(c, node)


def entries(c: Cluster, node: Node, op: str) -> dict[str, float]:
    """The agent's flannel_entries_total{op=`op`} by kind (route, arp, fdb)."""
    text = c.metrics(node, PORT)
    return {
        k: sample(text, "flannel_entries_total", op=op, kind=k) for k in ("route", "arp", "fdb")
    }


def tunnelled(c: Cluster, node: Node, peer: Node) -> bool:
    """`node` reaches `peer` through VXLAN: ARP, FDB and onlink route for it are all there."""
    net, mac = subnet(c, peer), device(c, peer)[1]
    gateway = net.split("/")[0]
    return (
        fdb(c, node).get(mac) == peer.ip
        and arp(c, node).get(gateway) == mac
        and our_routes(c, node).get(net) == (gateway, DEV, ["onlink"])
    )


def pings(lab: Lab, pairs: list[tuple[Node, Node]], timeout: float = 0.5) -> bool:
    """Every first node's container reaches every second node's container, in parallel."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = pool.map(
            lambda p: lab.ping(p[0].containers[0].ns, p[1].containers[0].ip, timeout=timeout),
            pairs,
        )
        return all(results)


def test_three_nodes_all_containers_reach_each_other(cluster):
    cluster.assert_all_reachable()
    n1, n2, n3, _ = cluster.lab.nodes
    assert cluster.env(n1)["FLANNEL_MTU"] == "1450"
    for node in (n1, n2, n3):
        index, mac = device(cluster, node)
        rec = record(cluster, node)
        assert rec == {
            "PublicIP": node.ip,
            "PublicIPv6": None,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": mac},
        }
        others = [p for p in (n1, n2, n3) if p is not node]
        assert all(tunnelled(cluster, node, p) for p in others), cluster.log(node)[-1500:]


def test_fourth_node_is_reachable_within_2s_of_ready(cluster):
    lab = cluster.lab
    *old, n4 = lab.nodes
    cluster.start(n4)
    wait_until(lambda: cluster.env(n4), 20, step=0.02, what="subnet.env of n4")
    ready = time.monotonic()
    cluster.wait_ready(n4)  # attaches n4's containers
    pairs = [(o, n4) for o in old] + [(n4, o) for o in old]
    wait_until(lambda: pings(lab, pairs), 5, step=0.05, what="n4 reachable")
    took = time.monotonic() - ready
    print(f"n4 reachable from all nodes {took:.2f} s after its subnet.env appeared")
    assert took < 2, f"took {took:.2f} s"
    assert all(tunnelled(cluster, o, n4) for o in old)


def test_deleted_device_is_back_within_one_reconcile_period(cluster):
    lab = cluster.lab
    n1, n2, n3, _ = lab.nodes
    index, mac = device(cluster, n2)
    added = entries(cluster, n2, "added")
    lab.run(n2.ns, "ip", "link", "del", DEV)
    gone = time.monotonic()

    def healed() -> bool:
        return tunnelled(cluster, n2, n1) and tunnelled(cluster, n2, n3)

    wait_until(healed, 2 * RECONCILE, step=0.05, what=f"{DEV} and its entries back on n2")
    took = time.monotonic() - gone
    print(f"{DEV} and every peer's entries back {took:.2f} s after `ip link del {DEV}`")
    assert took < RECONCILE + 0.3, f"took {took:.2f} s"
    assert pings(lab, [(n1, n2), (n2, n3), (n3, n2)], timeout=1.0)
    # a new device (the old one is gone), with the old identity, and the record unchanged
    new_index, new_mac, mtu, vni = device_details(cluster, n2)
    assert new_index != index and (new_mac, mtu, vni) == (mac, 1450, 1)
    assert record(cluster, n2)["BackendData"] == {"VNI": 1, "VtepMAC": mac}
    # every entry of both peers went with the device, and the agent programmed them again
    # (as "added": they hang on the new device's ifindex, so they are not counted as repairs)
    assert entries(cluster, n2, "added") == {k: n + 2 for k, n in added.items()}


def test_restart_loses_no_ping_and_keeps_the_device(cluster):
    lab = cluster.lab
    n1, n2, _, _ = lab.nodes
    before = kernel_state(cluster, n2)
    lease = cluster.lease_kv(subnet(cluster, n2))
    stream = lab.ping_stream(n1.containers[0].ns, n2.containers[0].ip, seconds=4, interval=0.02)
    time.sleep(0.5)
    took = cluster.stop(n2)
    assert took < 2, f"SIGTERM took {took:.2f} s"
    cluster.start(n2)
    cluster.wait_serving(n2)  # the new agent went through its first reconcile
    sent, answered = lab.stream_result(stream)
    assert sent >= 100 and answered == sent, f"{sent - answered} of {sent} pings lost"
    # the same device (ifindex, MAC, MTU, VNI) and the same FDB, ARP and route entries...
    assert kernel_state(cluster, n2) == before
    # ...which the new agent found in place: it added, changed (an upsert counts as added)
    # and removed nothing
    for op in ("added", "removed"):
        assert entries(cluster, n2, op) == {"route": 0, "arp": 0, "fdb": 0}, op
    # the lease was reused: the same key (not deleted and created again), the same etcd lease
    again = cluster.lease_kv(subnet(cluster, n2))
    assert again is not None and lease is not None
    assert (again["create_revision"], again["lease"]) == (lease["create_revision"], lease["lease"])


def test_stopped_node_with_deleted_lease_is_removed_everywhere(cluster):
    lab = cluster.lab
    *old, n4 = lab.nodes
    cluster.start(n4)
    cluster.wait_ready(n4)
    for node in old:
        wait_until(lambda node=node: tunnelled(cluster, node, n4), 5, what=f"n4 on {node.name}")
    net, mac = subnet(cluster, n4), device(cluster, n4)[1]
    cluster.stop(n4)
    lab.etcdctl("del", cluster.lease_key(net))

    def gone(node: Node) -> bool:
        return (
            mac not in fdb(cluster, node)
            and net.split("/")[0] not in arp(cluster, node)
            and net not in our_routes(cluster, node)
        )

    for node in old:
        wait_until(lambda node=node: gone(node), 5, what=f"{net} removed on {node.name}")
        assert net not in {p["subnet"] for p in cluster.status(node)["peers"]}
    assert pings(lab, [(old[0], old[1]), (old[1], old[2])])
    # `as_found` takes n4 out of the cluster for good afterwards (containers, kernel state)


def test_direct_routing_between_switch_neighbours_vxlan_to_the_remote_node():
    need_lab()
    config = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": True}}
    with Lab(nodes=3, containers=1, remote_nodes={3}) as lab:
        lab.start_etcd()
        c = Cluster(lab, config, (f"--reconcile-interval={RECONCILE:g}",))
        c.start_all()
        c.assert_all_reachable()
        n1, n2, n3 = lab.nodes
        for node, peer in ((n1, n2), (n2, n1)):
            assert our_routes(c, node)[subnet(c, peer)] == (peer.ip, "eth0", [])
            assert device(c, peer)[1] not in fdb(c, node)
        for node, peer in ((n1, n3), (n2, n3), (n3, n1), (n3, n2)):
            assert tunnelled(c, node, peer), c.log(node)[-1500:]
