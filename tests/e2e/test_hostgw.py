"""host-gw end to end: three lab nodes, real agents, real etcd, real packets.

The lab is shared by the module (building one takes seconds); `as_found` puts it back after
every test, so each test finds three ready agents whatever ran before it."""

from __future__ import annotations

import time

import pytest

from .cluster import as_found, ours, running, sample, wait_until

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}
PORT = 8471


@pytest.fixture(scope="module")
def shared():
    args = ("--reconcile-interval=2", "--healthz-ip=127.0.0.1", f"--healthz-port={PORT}")
    with running(CONFIG, args) as c:
        yield c


@pytest.fixture
def cluster(shared):
    with as_found(shared):
        yield shared


def test_every_container_reaches_every_other_node(cluster):
    cluster.assert_all_reachable()
    n1, n2, n3 = cluster.lab.nodes
    env2 = cluster.env(n2)
    assert env2["FLANNEL_NETWORK"] == "10.244.0.0/16"
    assert env2["FLANNEL_MTU"] == "1500" and env2["FLANNEL_IPMASQ"] == "false"
    routes = {r["dst"]: r for r in cluster.routes(n1)}
    sub2, sub3 = cluster.subnet(n2), cluster.subnet(n3)
    assert routes[sub2]["gateway"] == n2.ip and routes[sub3]["gateway"] == n3.ip
    assert routes[sub2]["dev"] == "eth0"
    assert ours(routes[sub2]) and ours(routes[sub3])


def test_readyz_answers_inside_the_node(cluster):
    assert cluster.http_get(cluster.lab.nodes[0], "/readyz", PORT) == (200, "flanneld is ready\n")


def test_hand_deleted_route_is_restored_by_next_reconcile(cluster):
    n1, n2, _ = cluster.lab.nodes
    sub2 = cluster.subnet(n2)

    def counter(name: str, **labels: str) -> float:
        return sample(cluster.metrics(n1, PORT), name, **labels)

    # Right after a full reconcile, so that the next one is ~2 s away: the ping below must
    # find the route still missing.
    runs = counter("flannel_reconcile_runs_total", mode="full")
    wait_until(
        lambda: counter("flannel_reconcile_runs_total", mode="full") > runs, 5, what="a full pass"
    )
    repaired = counter("flannel_entries_total", op="repaired", kind="route")
    cluster.lab.run(n1.ns, "ip", "route", "del", sub2)
    assert not cluster.lab.ping(n1.containers[0].ns, n2.containers[0].ip, timeout=0.5)
    wait_until(lambda: any(r["dst"] == sub2 for r in cluster.routes(n1)), 5, what="route back")
    assert cluster.lab.ping(n1.containers[0].ns, n2.containers[0].ip)
    # the agent put it back (and counted it as a repair), nobody else did
    route = next(r for r in cluster.routes(n1) if r["dst"] == sub2)
    assert ours(route) and route["gateway"] == n2.ip
    assert counter("flannel_entries_total", op="repaired", kind="route") == repaired + 1
    assert all(p["state"] == "ok" for p in cluster.status(n1)["peers"])


def test_restart_keeps_subnet_and_loses_no_ping(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    before = cluster.env(n2)["FLANNEL_SUBNET"]
    lease = cluster.lease_kv(cluster.subnet(n2))
    stream = lab.ping_stream(n1.containers[0].ns, n2.containers[0].ip, seconds=4, interval=0.02)
    time.sleep(0.5)
    took = cluster.stop(n2)
    assert took < 2, f"SIGTERM took {took:.2f} s"
    assert any(r["dst"] == cluster.subnet(n2) for r in cluster.routes(n1))
    cluster.subnet_file(n2).unlink()  # prove the lease comes back from etcd, not the file
    cluster.start(n2)
    env = cluster.wait_ready(n2)
    sent, answered = lab.stream_result(stream)
    assert env["FLANNEL_SUBNET"] == before
    assert sent >= 100 and answered == sent, f"{sent - answered} of {sent} pings lost"
    # the lease was reused: the same key (not deleted and created again), the same etcd lease
    again = cluster.lease_kv(cluster.subnet(n2))
    assert again is not None and lease is not None
    assert (again["create_revision"], again["lease"]) == (lease["create_revision"], lease["lease"])
    assert cluster.status(n2)["lease"]["subnet"] == cluster.subnet(n2)


def test_stopped_node_with_deleted_lease_is_removed_everywhere(cluster):
    lab = cluster.lab
    n1, n2, n3 = lab.nodes
    sub3 = cluster.subnet(n3)
    cluster.stop(n3)
    lab.etcdctl("del", cluster.lease_key(sub3))
    t0 = time.monotonic()
    for node in (n1, n2):
        wait_until(
            lambda node=node: sub3 not in {r["dst"] for r in cluster.routes(node)},
            5,
            what=f"route to {sub3} removed on {node.name}",
        )
    assert time.monotonic() - t0 < 5
    assert lab.ping(n1.containers[0].ns, n2.containers[0].ip)
    assert {p["subnet"] for p in cluster.status(n1)["peers"]} == {cluster.subnet(n2)}
    # `as_found` starts n3 again afterwards: it takes its subnet back from its subnet.env
