"""wireguard end to end with IPv6: a dual-stack lab (flannel-wg and flannel-wg-v6, the
reference's "separate" mode) and an IPv6-only one (flannel-wg-v6 alone). The userspace path,
as in test_wireguard.py: this machine's kernel has no WireGuard."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import sys
from ipaddress import IPv6Address, IPv6Network

import pytest

from backends.wireguard.keys import decode_key
from backends.wireguard.uapi import parse_get

from .cluster import PREFIX, ours, running
from .wireguard_kit import (
    CAPTURE,
    CONFIG,
    LISTENER,
    SENDER,
    ask,
    drop_dangling_links,
    finish,
    in_ns,
    need_wireguard_go,
    peers_by_subnet,
)


@contextlib.contextmanager
def _reachable_lab(ipv4: bool, mode: str = "separate"):
    """A 3-node IPv6 lab (dual-stack, or IPv6-only) on wireguard in `mode`, its ping matrices
    (IPv4 too in dual-stack) all answered."""
    config = {**CONFIG, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
    config["Backend"] = {"Type": "wireguard", "Mode": mode}
    if not ipv4:
        config["EnableIPv4"] = False
    need_wireguard_go()
    with contextlib.ExitStack() as stack:
        stack.callback(drop_dangling_links)
        c = stack.enter_context(running(config, ("--reconcile-interval=2",), ipv6=True))
        if ipv4:
            c.assert_all_reachable()
        matrix6 = c.wait_reachable(10, family=6)
        assert matrix6 and all(matrix6.values()), matrix6
        yield c


@pytest.mark.parametrize("ipv4", [True, False], ids=["dual-stack", "IPv6-only"])
def test_a_device_per_family(ipv4):
    """The reference's "separate" mode: flannel-wg-v6 (beside flannel-wg in dual-stack), the
    same key in BackendV6Data, peers at [PublicIPv6]:51821 with their IPv6 subnets; the ping
    matrices, and a payload sent over IPv6 never visible on the switch. IPv6-only: no IPv4
    device, route or BackendData (PublicIP 0.0.0.0, as the reference writes it)."""
    with _reachable_lab(ipv4) as c:
        lab = c.lab
        n1, n2, n3 = lab.nodes
        assert c.env(n1)["FLANNEL_MTU"] == "1420"
        link = json.loads(lab.run(n1.ns, "ip", "-j", "link", "show", "flannel-wg-v6").stdout)
        assert link[0]["mtu"] == 1420 and "UP" in link[0]["flags"]
        routes6 = json.loads(lab.run(n1.ns, "ip", "-6", "-j", "route", "show").stdout)
        [route] = [r for r in routes6 if r["dst"] == "fd00:10:244::/56"]
        assert route["dev"] == "flannel-wg-v6" and ours(route)
        key_of = {}
        records = [
            json.loads(v)
            for v in lab.etcdctl("get", "--prefix", "--print-value-only", f"{PREFIX}/subnets/")
            .strip()
            .split("\n")
        ]
        for doc in records:
            key_of[doc["PublicIPv6"]] = decode_key(doc["BackendV6Data"]["PublicKey"])
            if ipv4:
                assert doc["BackendData"] == doc["BackendV6Data"]
            else:
                assert doc["PublicIP"] == "0.0.0.0" and "BackendData" not in doc
        assert set(key_of) == {n.ip6 for n in lab.nodes}
        if not ipv4:
            names = {x["ifname"] for x in json.loads(lab.run(n1.ns, "ip", "-j", "link").stdout)}
            assert "flannel-wg" not in names
            assert not [r for r in c.routes(n1) if ours(r)]

        def subnet6(node) -> str:
            return str(IPv6Network(c.env(node)["FLANNEL_IPV6_SUBNET"], strict=False))

        path6 = c.state_dir(n1) / "wireguard" / "flannel-wg-v6.sock"
        state6 = parse_get(ask(path6, b"get=1\n\n"))
        assert state6.listen_port == 51821
        assert peers_by_subnet(state6) == {subnet6(n): key_of[n.ip6] for n in (n2, n3)}
        assert {p.endpoint for p in state6.peers.values()} == {
            (IPv6Address(n.ip6), 51821) for n in (n2, n3)
        }
        pattern = b"flannel-wg6-secret-" + secrets.token_hex(8).encode()
        c2 = n2.containers[0]
        capture = in_ns(c, lab.switch_ns, CAPTURE, "6", pattern.hex(), "51821")
        listener = in_ns(c, c2.ns, LISTENER, "5", "6")
        lab.run(n1.containers[0].ns, sys.executable, "-c", SENDER, c2.ip6, pattern.hex(), "50")
        got = finish(listener)
        seen = json.loads(finish(capture)[-1])
        assert sum(bytes.fromhex(d) == pattern for d in got) >= 45
        assert seen["wireguard"] >= 45 and seen["pattern"] == 0, seen


@pytest.mark.parametrize(
    ("mode", "ipv4"), [("auto", True), ("ipv6", True), ("auto", False)],
    ids=["auto", "ipv6", "auto-IPv6-only"],
)  # fmt: skip
def test_one_device_for_both_families(mode, ipv4):
    """The reference's single-device modes: flannel-wg alone carries IPv4 and IPv6, one peer
    per node with both its subnets, at PublicIP:51820 ("auto": the lab's addresses are not
    RFC 1918) or [PublicIPv6]:51820 ("ipv6", and "auto" in an IPv6-only network); the ping
    matrices."""
    with _reachable_lab(ipv4, mode) as c:
        lab = c.lab
        n1, n2, n3 = lab.nodes
        names = {x["ifname"] for x in json.loads(lab.run(n1.ns, "ip", "-j", "link").stdout)}
        assert "flannel-wg" in names and "flannel-wg-v6" not in names
        networks = [("-4", "10.244.0.0/16")] * ipv4 + [("-6", "fd00:10:244::/56")]
        for family, network in networks:
            routes = json.loads(lab.run(n1.ns, "ip", family, "-j", "route", "show").stdout)
            [route] = [r for r in routes if r["dst"] == network]
            assert route["dev"] == "flannel-wg" and ours(route)
        state = parse_get(ask(c.state_dir(n1) / "wireguard" / "flannel-wg.sock", b"get=1\n\n"))
        assert state.listen_port == 51820 and len(state.peers) == 2
        for node in (n2, n3):
            env = c.env(node)
            subnets = [env["FLANNEL_IPV6_SUBNET"], *([env["FLANNEL_SUBNET"]] if ipv4 else [])]
            want = {ipaddress.ip_network(x, strict=False) for x in subnets}
            [peer] = [p for p in state.peers.values() if p.allowed_ips == want]
            address = node.ip6 if mode == "ipv6" or not ipv4 else node.ip
            assert peer.endpoint == (ipaddress.ip_address(address), 51820)
