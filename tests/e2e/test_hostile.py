"""Hostile input in 3-node labs (issue 12): lease records any node could write, a config that
breaks hosts, an etcd that comes back empty. Each must cost nothing but itself: the node's own
routes untouched, every container still reaching every other, the rejection visible."""

from __future__ import annotations

import json
import shutil
import time
from ipaddress import IPv4Network

import pytest

from .cluster import PREFIX, Cluster, running, wait_until

NETWORK = IPv4Network("10.244.0.0/16")
ARGS = ("--reconcile-interval=1", "--healthz-ip=127.0.0.1", "--healthz-port=8471")


def subnet(c: Cluster, node) -> IPv4Network:
    return IPv4Network(c.env(node)["FLANNEL_SUBNET"], strict=False)


def metric(c: Cluster, node, name: str, **labels: str) -> float:
    for line in c.http_get(node, "/metrics", 8471)[1].splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def foreign_routes(c: Cluster, node) -> list[dict]:
    """The node's routes that are not the agent's (protocol 155): they must never change."""
    return [r for r in c.routes(node) if r.get("protocol") not in ("155", 155)]


def record(ip: str, backend: str, data: object = None) -> str:
    doc = {"PublicIP": ip, "PublicIPv6": None, "BackendType": backend}
    if backend == "udp":
        doc.pop("BackendType")
    if data is not None:
        doc["BackendData"] = data
    return json.dumps(doc)


@pytest.mark.parametrize("backend", ["host-gw", "vxlan", "udp"])
def test_hostile_records_take_over_nothing(backend):
    with running({"Network": str(NETWORK), "Backend": {"Type": backend}}, ARGS) as c:
        c.assert_all_reachable()
        lab = c.lab
        n1, n2, n3 = lab.nodes
        own = subnet(c, n1)
        before = {n.name: foreign_routes(c, n) for n in lab.nodes}
        data = {"VNI": 1, "VtepMAC": "0a:00:00:00:00:66"} if backend == "vxlan" else None
        peer = record(n2.ip, backend, data)
        hostile = {
            "0.0.0.0-0": peer,  # the default route
            f"{own.network_address}-25": peer,  # half of node 1's own containers
            "198.51.100.0-24": peer,  # outside Network
            f"{own.network_address}-024": peer,  # an alias of node 1's own key
            "10.244.250.0-24": record("127.0.0.1", backend, data),  # loopback gateway
            "10.244.251.0-24": record("10.244.9.9", backend, data),  # gateway in the overlay
            "10.244.252.0-24": '{"PublicIP":"192.0.2.99","BackendData":'
            + "[" * 2000
            + "]" * 2000
            + "}",
        }
        for key, value in hostile.items():
            lab.etcdctl("put", f"{PREFIX}/subnets/{key}", value)

        def all_rejected() -> bool:
            return {r["key"] for r in c.status(n1)["rejected"]} == set(hostile)

        wait_until(all_rejected, 10, what="every hostile record rejected on n1")
        time.sleep(2.5)  # two more full passes
        for node in lab.nodes:
            assert foreign_routes(c, node) == before[node.name]
            for r in c.routes(node):
                if r.get("protocol") not in ("155", 155):
                    continue
                dst = IPv4Network("0.0.0.0/0" if r["dst"] == "default" else r["dst"])
                assert dst.subnet_of(NETWORK), r
                assert dst == NETWORK or not dst.overlaps(subnet(c, node)), r  # udp: one route
        c.assert_all_reachable()
        rules = {r["key"]: r["rule"] for r in c.status(n1)["rejected"]}
        assert rules["0.0.0.0-0"] == "outside_network"
        assert rules[f"{own.network_address}-25"] == "subnet_len"
        assert rules[f"{own.network_address}-024"] == "key"
        assert rules["10.244.250.0-24"] == rules["10.244.251.0-24"] == "public_ip"
        assert rules["10.244.252.0-24"] == "malformed"
        assert metric(c, n1, "flannel_lease_records_rejected", rule="public_ip") == 2

        # the watch is not stalled: a node restarting meets all of it and becomes ready,
        # and its peers learn about it as usual
        c.stop(n3)
        c.subnet_file(n3).unlink()  # so that ready means this run's subnet.env
        c.start(n3)
        c.wait_ready(n3)
        doc3 = c.status(n3)
        assert {r["key"] for r in doc3["rejected"]} == set(hostile), (doc3, c.log(n3)[-3000:])
        c.assert_all_reachable(timeout=15)


def test_etcd_wiped_and_restored_loses_no_ping_and_keeps_every_subnet():
    """etcd's data dir lost; an operator starts it empty and writes the config again. The
    agents keep their peers and routes and put their own leases back, same subnets."""
    config = {"Network": str(NETWORK), "Backend": {"Type": "vxlan"}}
    with running(config, ARGS) as c:
        c.assert_all_reachable()
        lab = c.lab
        n1, n2, n3 = lab.nodes
        subnets = {n.name: subnet(c, n) for n in lab.nodes}
        pairs = [(n1, n2), (n2, n3), (n3, n1)]
        streams = [
            lab.ping_stream(a.containers[0].ns, b.containers[0].ip, 20, 0.025) for a, b in pairs
        ]
        time.sleep(1)
        lab.stop_etcd()
        shutil.rmtree(lab.workdir / "etcd-data")
        lab.start_etcd()
        c.put_config()

        def registered() -> bool:
            out = lab.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/")
            keys = {k.rsplit("/", 1)[1] for k in out.split()}
            return keys == {f"{s.network_address}-{s.prefixlen}" for s in subnets.values()}

        wait_until(registered, 15, what="every node's lease written again")
        for node in lab.nodes:
            assert metric(c, node, "flannel_etcd_data_losses_total") == 1
            routes = {r["dst"] for r in c.routes(node)}
            for other in lab.nodes:
                if other is not node:
                    assert str(subnets[other.name]) in routes
        results = [lab.stream_result(p, timeout=40) for p in streams]
        assert all(sent > 300 and sent == answered for sent, answered in results), results
        assert {n.name: subnet(c, n) for n in lab.nodes} == subnets
        c.assert_all_reachable()


def test_invalid_config_keeps_the_running_one_and_a_restart_uses_the_last_good():
    config = {"Network": str(NETWORK), "Backend": {"Type": "vxlan"}}
    with running(config, ARGS) as c:
        c.assert_all_reachable()
        lab = c.lab
        n1, n2, _ = lab.nodes
        before = subnet(c, n2)
        # written past `flannelctl config set`, which refuses it
        bad = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": "x"}}
        lab.etcdctl("put", f"{PREFIX}/config", json.dumps(bad))
        wait_until(
            lambda: metric(c, n1, "flannel_config_current") == 0 or None,
            10,
            what="the running agent to notice the invalid config",
        )
        assert "Backend.VNI" in c.status(n1)["config"]["problem"]
        c.stop(n2)
        c.subnet_file(n2).unlink()  # so that ready means this run's subnet.env
        c.start(n2)
        c.wait_ready(n2)
        doc = c.status(n2)
        assert doc["ready"] and doc["config"]["source"] == "saved"
        assert subnet(c, n2) == before
        c.assert_all_reachable()
        c.put_config()  # the operator mends it
        wait_until(
            lambda: metric(c, n1, "flannel_config_current") == 1 or None,
            10,
            what="the mended config to be seen as the running one",
        )
