"""host-gw end to end: three lab nodes, real agents, real etcd, real packets."""

from __future__ import annotations

import time

import pytest

from .cluster import PREFIX, running, wait_until

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}


@pytest.fixture(scope="module")
def cluster():
    args = ("--reconcile-interval=2", "--healthz-ip=127.0.0.1", "--healthz-port=8471")
    with running(CONFIG, args) as c:
        yield c


def test_every_container_reaches_every_other_node(cluster):
    cluster.assert_all_reachable()
    n1, n2, n3 = cluster.lab.nodes
    env2, env3 = cluster.env(n2), cluster.env(n3)
    assert env2["FLANNEL_NETWORK"] == "10.244.0.0/16"
    assert env2["FLANNEL_MTU"] == "1500" and env2["FLANNEL_IPMASQ"] == "false"
    routes = {r["dst"]: r for r in cluster.routes(n1)}
    sub2 = env2["FLANNEL_SUBNET"].replace(".1/", ".0/")
    sub3 = env3["FLANNEL_SUBNET"].replace(".1/", ".0/")
    assert routes[sub2]["gateway"] == n2.ip and routes[sub3]["gateway"] == n3.ip
    assert routes[sub2]["dev"] == "eth0"


def test_readyz_answers_inside_the_node(cluster):
    assert cluster.http_get(cluster.lab.nodes[0], "/readyz", 8471) == (200, "flanneld is ready\n")


def test_hand_deleted_route_is_restored_by_next_reconcile(cluster):
    n1, n2, _ = cluster.lab.nodes
    sub2 = cluster.env(n2)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    cluster.lab.run(n1.ns, "ip", "route", "del", sub2)
    assert not cluster.lab.ping(n1.containers[0].ns, n2.containers[0].ip, timeout=0.5)
    wait_until(lambda: any(r["dst"] == sub2 for r in cluster.routes(n1)), 5, what="route back")
    assert cluster.lab.ping(n1.containers[0].ns, n2.containers[0].ip)
    assert "restored" in cluster.log(n1) or "added" in cluster.log(n1)


def test_restart_keeps_subnet_and_loses_no_ping(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    before = cluster.env(n2)["FLANNEL_SUBNET"]
    stream = lab.ping_stream(n1.containers[0].ns, n2.containers[0].ip, seconds=4, interval=0.02)
    time.sleep(0.5)
    took = cluster.stop(n2)
    assert took < 2, f"SIGTERM took {took:.2f} s"
    assert any(r["dst"] == before.replace(".1/", ".0/") for r in cluster.routes(n1))
    cluster.subnet_file(n2).unlink()  # prove the lease comes back from etcd, not the file
    cluster.start(n2)
    env = cluster.wait_ready(n2)
    sent, answered = lab.stream_result(stream)
    assert env["FLANNEL_SUBNET"] == before
    assert sent >= 100 and answered == sent, f"{sent - answered} of {sent} pings lost"
    assert "reusing lease" in cluster.log(n2)


def test_stopped_node_with_deleted_lease_is_removed_everywhere(cluster):
    lab = cluster.lab
    n1, n2, n3 = lab.nodes
    sub3 = cluster.env(n3)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    cluster.stop(n3)
    lab.etcdctl("del", f"{PREFIX}/subnets/{sub3.replace('/', '-')}")
    t0 = time.monotonic()
    for node in (n1, n2):
        wait_until(
            lambda node=node: sub3 not in {r["dst"] for r in cluster.routes(node)},
            5,
            what=f"route to {sub3} removed on {node.name}",
        )
    assert time.monotonic() - t0 < 5
    assert lab.ping(n1.containers[0].ns, n2.containers[0].ip)
    cluster.start(n3)  # leave the cluster whole for whoever runs next
    cluster.wait_ready(n3)
    cluster.assert_all_reachable()
