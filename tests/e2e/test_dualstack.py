"""Dual-stack end to end (issue 15): three lab nodes with an IPv4 and an IPv6 underlay, real
agents and etcd; both ping matrices, IPv6 drift repaired, a removed node's IPv6 entries gone,
a restart without loss, and a record written exactly as the reference writes it programmed."""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Network, IPv6Network

import pytest

from flanneld.core.subnets import subnet_key

from .cluster import PREFIX, running, wait_until

CONFIG = {
    "Network": "10.244.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10:244::/56",
}
ARGS = ("--reconcile-interval=1",)


def routes6(c, node) -> dict[str, dict]:
    out = c.lab.run(node.ns, "ip", "-6", "-j", "route", "show", "table", "main").stdout
    return {r["dst"]: r for r in json.loads(out)}


def subnet6(c, node) -> str:
    return str(IPv6Network(c.env(node)["FLANNEL_IPV6_SUBNET"], strict=False))


def restart_over_ipv6_pings(c, n1, n2) -> dict[str, str]:
    """n2's agent restarted (subnet.env gone: its lease is found in etcd) while n1's container
    pings n2's over IPv6 every 20 ms; asserts none was lost; n2's subnet.env afterwards."""
    lab = c.lab
    stream = lab.ping_stream(n1.containers[0].ns, n2.containers[0].ip6, 4, 0.02)
    time.sleep(0.5)
    c.stop(n2)
    c.subnet_file(n2).unlink()
    c.start(n2)
    after = c.wait_ready(n2)
    sent, answered = lab.stream_result(stream)
    assert sent >= 100 and answered == sent, f"{sent - answered} of {sent} IPv6 pings lost"
    return after


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_dual_stack(backend):
    config = {**CONFIG, "Backend": {"Type": backend}}
    with running(config, ARGS, ipv6=True) as c:
        lab = c.lab
        n1, n2, n3 = lab.nodes
        env = c.env(n1)
        assert env["FLANNEL_IPV6_NETWORK"] == "fd00:10:244::/56"
        assert env["FLANNEL_MTU"] == ("1500" if backend == "host-gw" else "1430")
        c.assert_all_reachable()
        matrix6 = c.wait_reachable(10, family=6)
        assert matrix6 and all(matrix6.values()), matrix6

        # every peer's IPv6 subnet is routed, with our protocol, on every node
        s2, s3 = subnet6(c, n2), subnet6(c, n3)
        r = routes6(c, n1)
        assert r[s2]["protocol"] in ("155", 155) and r[s3]["protocol"] in ("155", 155)
        if backend == "host-gw":
            assert r[s2]["gateway"] == n2.ip6
        else:
            assert r[s2]["dev"] == "flannel-v6.1"

        # the status shows the IPv6 half of each peer
        peers = {p["subnet"]: p for p in c.status(n1)["peers"]}
        assert {p["ipv6_subnet"] for p in peers.values()} == {s2, s3}

        # a hand-deleted IPv6 route comes back with the next full pass
        lab.run(n1.ns, "ip", "-6", "route", "del", s2)
        wait_until(lambda: s2 in routes6(c, n1), 5, what="the IPv6 route restored")
        assert lab.ping(n1.containers[0].ns, n2.containers[0].ip6)

        # restart without loss, IPv6 included; the same subnets afterwards
        before = (c.env(n2)["FLANNEL_SUBNET"], c.env(n2)["FLANNEL_IPV6_SUBNET"])
        after = restart_over_ipv6_pings(c, n1, n2)
        assert (after["FLANNEL_SUBNET"], after["FLANNEL_IPV6_SUBNET"]) == before

        # a record written exactly as the reference writes it is programmed
        ref_key = f"{PREFIX}/subnets/10.244.250.0-24&fd00:10:244:fa::-64"
        record = {"PublicIP": "192.0.2.99", "PublicIPv6": "fd00:192::99", "BackendType": backend}
        if backend == "vxlan":
            record["BackendData"] = {"VNI": 1, "VtepMAC": "0a:00:00:00:00:99"}
            record["BackendV6Data"] = {"VNI": 1, "VtepMAC": "0a:00:00:00:01:99"}
        lab.etcdctl("put", ref_key, json.dumps(record, separators=(",", ":")))
        wait_until(
            lambda: "fd00:10:244:fa::/64" in routes6(c, n1), 5, what="the reference's v6 route"
        )
        lab.etcdctl("del", ref_key)
        wait_until(lambda: "fd00:10:244:fa::/64" not in routes6(c, n1), 5, what="its route removed")

        # a removed node's IPv6 entries are gone from every other node
        c.stop(n3)
        key3 = subnet_key(IPv4Network(c.subnet(n3)), IPv6Network(s3))
        lab.etcdctl("del", f"{PREFIX}/subnets/{key3}")
        for node in (n1, n2):
            wait_until(
                lambda node=node: s3 not in routes6(c, node), 5, what=f"{s3} gone on {node.name}"
            )
        if backend == "vxlan":
            fdb = lab.run(n1.ns, "bridge", "-j", "fdb", "show", "dev", "flannel-v6.1").stdout
            assert n3.ip6 not in fdb


def routes4(c, node) -> list[dict]:
    out = c.lab.run(node.ns, "ip", "-4", "-j", "route", "show", "table", "main").stdout
    return [r for r in json.loads(out) if str(r.get("protocol")) == "155"]


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_ipv6_only(backend):
    """EnableIPv4 false: leases `0.0.0.0-0&<IPv6 subnet>` as the reference's MakeSubnetKey
    writes them, one per node (every record's PublicIP is 0.0.0.0: the nodes are told apart
    by PublicIPv6), containers with IPv6 alone reach each other, and the agent makes no IPv4
    state: no IPv4 route of ours, no flannel.1 device, no FLANNEL_SUBNET."""
    config = {
        "EnableIPv4": False,
        "EnableIPv6": True,
        "IPv6Network": "fd00:10:244::/56",
        "Backend": {"Type": backend},
    }
    with running(config, ARGS, ipv6=True) as c:
        lab = c.lab
        n1, n2, n3 = lab.nodes
        env = c.env(n1)
        assert "FLANNEL_SUBNET" not in env and "FLANNEL_NETWORK" not in env
        assert env["FLANNEL_IPV6_NETWORK"] == "fd00:10:244::/56"
        assert env["FLANNEL_MTU"] == ("1500" if backend == "host-gw" else "1430")
        subnets = {n.name: subnet6(c, n) for n in lab.nodes}
        assert len(set(subnets.values())) == 3  # no two nodes share a lease

        keys = lab.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").split()
        want = {f"{PREFIX}/subnets/0.0.0.0-0&{s.replace('/', '-')}" for s in subnets.values()}
        assert set(keys) == want
        record = json.loads(lab.etcdctl("get", "--print-value-only", sorted(want)[0]))
        assert record["PublicIP"] == "0.0.0.0" and "BackendData" not in record
        assert record["PublicIPv6"] in {n.ip6 for n in lab.nodes}

        assert all(cont.ip is None and cont.ip6 for n in lab.nodes for cont in n.containers)
        matrix6 = c.wait_reachable(10, family=6)
        assert matrix6 and all(matrix6.values()), matrix6
        for node in lab.nodes:
            assert routes4(c, node) == [], f"IPv4 routes of ours on {node.name}"
            links = json.loads(lab.run(node.ns, "ip", "-j", "link", "show").stdout)
            assert "flannel.1" not in {link["ifname"] for link in links}

        r = routes6(c, n1)
        s2, s3 = subnets["n2"], subnets["n3"]
        assert str(r[s2]["protocol"]) == "155"
        assert r[s2]["gateway" if backend == "host-gw" else "dev"] == (
            n2.ip6 if backend == "host-gw" else "flannel-v6.1"
        )
        status = c.status(n1)
        assert status["lease"]["subnet"] is None and status["lease"]["ipv6_subnet"] == subnets["n1"]
        assert {p["ipv6_subnet"] for p in status["peers"]} == {s2, s3}
        assert all(p["subnet"] is None for p in status["peers"])

        # a hand-deleted route comes back; a restart keeps the subnet and loses no ping
        lab.run(n1.ns, "ip", "-6", "route", "del", s2)
        wait_until(lambda: s2 in routes6(c, n1), 5, what="the IPv6 route restored")
        after = restart_over_ipv6_pings(c, n1, n2)
        assert str(IPv6Network(after["FLANNEL_IPV6_SUBNET"], strict=False)) == s2

        # a dual-stack record in this IPv6-only network is rejected, and programs nothing
        bad_key = f"{PREFIX}/subnets/10.244.250.0-24&fd00:10:244:fa::-64"
        lab.etcdctl("put", bad_key, json.dumps({"PublicIP": "192.0.2.99",
                    "PublicIPv6": "fd00:192::99", "BackendType": backend}))  # fmt: skip
        wait_until(
            lambda: any(x["key"].startswith("10.244.250.0") for x in c.status(n1)["rejected"]),
            5,
            what="the dual-stack record rejected",
        )
        assert "fd00:10:244:fa::/64" not in routes6(c, n1) and routes4(c, n1) == []

        # a removed node's entries are gone from every other node
        c.stop(n3)
        lab.etcdctl("del", f"{PREFIX}/subnets/0.0.0.0-0&{s3.replace('/', '-')}")
        for node in (n1, n2):
            wait_until(
                lambda node=node: s3 not in routes6(c, node), 5, what=f"{s3} gone on {node.name}"
            )
