"""vxlan against a real kernel, in a throw-away namespace: the device (create, reuse, replace,
re-create with the same MAC), its address, and the ARP/FDB/route entries per peer; in
dual-stack the IPv6 device `flannel-v6.1` and its NDP/FDB/route entries too.

Each test gets its own namespace `fltest-<random>` with a veth pair `ul0`/`ul0p` inside it and
192.0.2.10/24 and 2001:db8::10/64 on `ul0`; the namespace is deleted afterwards, also when the
test fails.
"""

import json
import os
import secrets
import shutil
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from backends import netlink
from backends.base import BackendContext
from backends.reconcile import Fdb, Neigh
from backends.rtnl import Rtnl
from backends.vxlan import VxlanBackend
from backends.vxlanplan import vtep_mac
from flanneld.core.config import ConfigError, parse_config
from flanneld.core.interfaces import ExternalInterface
from flanneld.core.lease import Lease, LeaseAttrs

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("bridge") is None,
        reason="needs root and iproute2 to create a network namespace",
    ),
]

DEV = "flannel.1"
PUBLIC_IP = IPv4Address("192.0.2.10")
MAC = vtep_mac(PUBLIC_IP, 1)
LOCAL = Lease(
    IPv4Network("10.244.1.0/24"), LeaseAttrs(PUBLIC_IP, "vxlan", {"VNI": 1, "VtepMAC": MAC})
)
M2, M3 = "0a:00:00:00:00:02", "0a:00:00:00:00:03"


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=10).stdout


def ip(ns: str, *args: str) -> str:
    return run("ip", "-n", ns, *args)


def link(ns: str, name: str = DEV) -> dict:
    return json.loads(ip(ns, "-d", "-j", "link", "show", "dev", name))[0]


def fdb(ns: str) -> dict[str, str]:
    """The FDB of the device as `bridge` sees it: MAC → dst, permanent entries only."""
    entries = json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", DEV))
    return {e["mac"]: e.get("dst") for e in entries if "permanent" in e.get("state", "")}


def arp(ns: str) -> dict[str, str]:
    entries = json.loads(ip(ns, "-j", "neigh", "show", "dev", DEV))
    return {e["dst"]: e["lladdr"] for e in entries if "PERMANENT" in e.get("state", [])}


def routes(ns: str) -> dict[str, dict]:
    return {r["dst"]: r for r in json.loads(ip(ns, "-j", "route", "show", "table", "main"))}


def peer(net: str, public_ip: str, mac: str) -> Lease:
    return Lease(
        IPv4Network(net), LeaseAttrs(IPv4Address(public_ip), "vxlan", {"VNI": 1, "VtepMAC": mac})
    )


def peers(*leases: Lease) -> dict[IPv4Network, Lease]:
    return {lease.subnet: lease for lease in leases}


P2 = peer("10.244.2.0/24", "192.0.2.11", M2)
P3 = peer("10.244.3.0/24", "198.18.0.13", M3)


@pytest.fixture
def ns():
    name = f"fltest-{secrets.token_hex(4)}"
    run("ip", "netns", "add", name)
    try:
        ip(name, "link", "add", "name", "ul0", "type", "veth", "peer", "name", "ul0p")
        ip(name, "addr", "add", "192.0.2.10/24", "dev", "ul0")
        ip(name, "addr", "add", "2001:db8::10/64", "dev", "ul0", "nodad")
        ip(name, "link", "set", "dev", "ul0", "up")
        ip(name, "link", "set", "dev", "ul0p", "up")
        ip(name, "route", "add", "default", "via", "192.0.2.1", "dev", "ul0")
        ip(name, "-6", "route", "add", "default", "via", "2001:db8::1", "dev", "ul0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def make(ns: str, tmp_path: Path, **options: object) -> VxlanBackend:
    ext = ExternalInterface("ul0", link(ns, "ul0")["ifindex"], PUBLIC_IP, PUBLIC_IP, 1500)
    config = parse_config(
        json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", **options}})
    )
    return VxlanBackend(BackendContext(ext, config, tmp_path, config.backend), netns=ns)


async def prepare_once(ns: str, tmp_path: Path) -> None:
    """A fresh backend's prepare() over whatever device is there, its socket closed again."""
    b = make(ns, tmp_path)
    try:
        await b.prepare()
    finally:
        await b.close()


@pytest.fixture
async def backend(ns, tmp_path: Path):
    b = make(ns, tmp_path)
    try:
        await b.prepare()
        await b.configure(LOCAL)
        yield b
    finally:
        await b.close()


async def test_prepare_creates_the_device_the_reference_way(ns, tmp_path) -> None:
    b = make(ns, tmp_path)
    try:
        attrs = await b.prepare()
    finally:
        await b.close()
    assert attrs == LeaseAttrs(PUBLIC_IP, "vxlan", {"VNI": 1, "VtepMAC": MAC})
    dev = link(ns)
    info = dev["linkinfo"]["info_data"]
    assert dev["address"] == MAC and dev["mtu"] == 1450 == b.mtu
    assert (info["id"], info["local"], info["link"], info["port"]) == (1, "192.0.2.10", "ul0", 8472)
    assert info["learning"] is False and "gbp" not in info


async def test_configure_sets_the_address_and_brings_it_up(ns, backend) -> None:
    ip(ns, "addr", "add", "10.244.9.0/32", "dev", DEV)  # an old lease's address: removed
    ip(ns, "addr", "add", "172.16.0.1/32", "dev", DEV)  # not the flannel network: kept
    await backend.configure(LOCAL)
    dev = json.loads(ip(ns, "-j", "addr", "show", "dev", DEV))[0]
    addrs = {(a["local"], a["prefixlen"]) for a in dev["addr_info"] if a["family"] == "inet"}
    assert addrs == {("10.244.1.0", 32), ("172.16.0.1", 32)}
    assert "UP" in dev["flags"]


async def test_compatible_device_is_reused_untouched(ns, backend, tmp_path) -> None:
    index = link(ns)["ifindex"]
    await backend.reconcile(LOCAL, peers(P2))
    again = make(ns, tmp_path)
    try:
        assert (await again.prepare()).backend_data["VtepMAC"] == MAC
        await again.configure(LOCAL)
        result = await again.reconcile(LOCAL, peers(P2))
    finally:
        await again.close()
    assert link(ns)["ifindex"] == index and not result.changed


async def test_compatible_device_with_another_mac_is_kept_and_gets_ours(ns, tmp_path) -> None:
    # As the reference flanneld leaves it: compatible, but with a random MAC and no MTU set.
    ip(ns, "link", "add", DEV, "address", "0a:aa:aa:aa:aa:aa", "type", "vxlan", "id", "1",
       "local", "192.0.2.10", "dev", "ul0", "dstport", "8472", "nolearning")  # fmt: skip
    ip(ns, "link", "set", "dev", DEV, "mtu", "1400", "up")
    index = link(ns)["ifindex"]
    await prepare_once(ns, tmp_path)
    dev = link(ns)
    assert (dev["ifindex"], dev["address"], dev["mtu"]) == (index, MAC, 1450)
    assert "UP" in dev["flags"]


async def test_incompatible_device_is_replaced_with_the_same_mac(ns, tmp_path) -> None:
    ip(ns, "link", "add", DEV, "type", "vxlan", "id", "1", "local", "192.0.2.10",
       "dev", "ul0", "dstport", "4789")  # fmt: skip
    index = link(ns)["ifindex"]
    await prepare_once(ns, tmp_path)
    dev = link(ns)
    assert dev["ifindex"] != index and dev["address"] == MAC
    assert dev["linkinfo"]["info_data"]["port"] == 8472


async def test_options_reach_the_device(ns, tmp_path) -> None:
    b = make(ns, tmp_path, VNI=7, Port=4789, GBP=True, Learning=True, MTU=1400)
    try:
        attrs = await b.prepare()
    finally:
        await b.close()
    dev = link(ns, "flannel.7")
    info = dev["linkinfo"]["info_data"]
    assert attrs.backend_data == {"VNI": 7, "VtepMAC": vtep_mac(PUBLIC_IP, 7)}
    assert (info["id"], info["port"], info["learning"], info["gbp"]) == (7, 4789, True, True)
    assert dev["mtu"] == 1350 == b.mtu


async def test_peers_get_arp_fdb_and_onlink_route(ns, backend) -> None:
    result = await backend.reconcile(LOCAL, peers(P2, P3))
    assert result.added == {"arp": 2, "fdb": 2, "route": 2} and not result.failed
    assert fdb(ns) == {M2: "192.0.2.11", M3: "198.18.0.13"}
    assert arp(ns) == {"10.244.2.0": M2, "10.244.3.0": M3}
    r = routes(ns)["10.244.2.0/24"]
    assert (r["gateway"], r["dev"], r["flags"]) == ("10.244.2.0", DEV, ["onlink"])
    assert r["protocol"] == str(netlink.ROUTE_PROTOCOL)
    assert not (await backend.reconcile(LOCAL, peers(P2, P3))).changed


async def test_hand_deleted_entries_are_restored(ns, backend) -> None:
    await backend.reconcile(LOCAL, peers(P2, P3))
    run("bridge", "-n", ns, "fdb", "del", M2, "dev", DEV, "dst", "192.0.2.11")
    ip(ns, "neigh", "del", "10.244.3.0", "dev", DEV)
    ip(ns, "route", "del", "10.244.3.0/24")
    result = await backend.reconcile(LOCAL, peers(P2, P3))
    assert result.added == {"arp": 1, "fdb": 1, "route": 1} and not result.removed
    assert result.repaired == result.added  # all three counted as repairs
    assert fdb(ns) == {M2: "192.0.2.11", M3: "198.18.0.13"}
    assert arp(ns)["10.244.3.0"] == M3 and "10.244.3.0/24" in routes(ns)


async def test_entries_changed_by_hand_between_cached_passes_are_restored_by_a_full_pass(
    ns, backend
) -> None:
    await backend.reconcile(LOCAL, peers(P2, P3))
    await backend.reconcile(LOCAL, peers(P2, P3), full=False)  # the plan now comes from its cache
    ip(ns, "route", "del", "10.244.3.0/24")
    run("bridge", "-n", ns, "fdb", "replace", M2, "dev", DEV, "dst", "192.0.2.99")
    moved = peer("10.244.2.0/24", "192.0.2.12", M2)
    # An event pass diffs only what the plan changed (P2's FDB entry), not P3's route.
    result = await backend.reconcile(LOCAL, peers(moved, P3), full=False)
    assert result.added == {"fdb": 1} and "10.244.3.0/24" not in routes(ns)
    assert fdb(ns)[M2] == "192.0.2.12"
    run("bridge", "-n", ns, "fdb", "replace", M2, "dev", DEV, "dst", "192.0.2.99")
    result = await backend.reconcile(LOCAL, peers(moved, P3))  # full: a fresh dump
    assert result.added == {"fdb": 1, "route": 1} and not result.removed
    assert result.repaired == {"route": 1}  # the FDB entry was changed, not deleted
    assert fdb(ns) == {M2: "192.0.2.12", M3: "198.18.0.13"} and "10.244.3.0/24" in routes(ns)
    assert not (await backend.reconcile(LOCAL, peers(moved, P3))).changed


async def test_removed_peer_and_stale_entries_are_cleaned(ns, backend) -> None:
    await backend.reconcile(LOCAL, peers(P2, P3))
    # Left by an earlier run for a peer that vanished while the agent was down.
    run("bridge", "-n", ns, "fdb", "append", "0a:00:00:00:00:07", "dev", DEV, "dst", "192.0.2.17")
    # Flooding entry of someone else: never ours to touch.
    run("bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", DEV, "dst", "192.0.2.99")
    result = await backend.reconcile(LOCAL, peers(P2))
    assert result.removed == {"arp": 1, "fdb": 2, "route": 1} and not result.added
    assert fdb(ns) == {M2: "192.0.2.11", "00:00:00:00:00:00": "192.0.2.99"}
    assert arp(ns) == {"10.244.2.0": M2} and "10.244.3.0/24" not in routes(ns)


async def test_mac_change_replaces_arp_and_drops_the_old_fdb_entry(ns, backend) -> None:
    await backend.reconcile(LOCAL, peers(P2))
    moved = peer("10.244.2.0/24", "192.0.2.11", "0a:00:00:00:00:22")
    result = await backend.reconcile(LOCAL, peers(moved))
    assert result.removed == {"fdb": 1} and result.added == {"arp": 1, "fdb": 1}
    assert fdb(ns) == {"0a:00:00:00:00:22": "192.0.2.11"}
    assert arp(ns) == {"10.244.2.0": "0a:00:00:00:00:22"}


async def test_public_ip_change_moves_the_fdb_entry_in_place(ns, backend) -> None:
    await backend.reconcile(LOCAL, peers(P2))
    moved = peer("10.244.2.0/24", "192.0.2.21", M2)  # a reference peer keeps its MAC
    result = await backend.reconcile(LOCAL, peers(moved))
    assert result.added == {"fdb": 1} and not result.removed
    listed = json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", DEV))
    assert [(e["mac"], e["dst"]) for e in listed] == [(M2, "192.0.2.21")]


async def test_deleted_device_is_recreated_with_same_mac_and_replayed(ns, backend) -> None:
    await backend.reconcile(LOCAL, peers(P2, P3))
    ip(ns, "link", "del", DEV)
    assert "10.244.2.0/24" not in routes(ns)
    result = await backend.reconcile(LOCAL, peers(P2, P3))
    assert result.added == {"arp": 2, "fdb": 2, "route": 2}
    dev = json.loads(ip(ns, "-j", "addr", "show", "dev", DEV))[0]
    assert dev["address"] == MAC and "UP" in dev["flags"]
    assert [a["local"] for a in dev["addr_info"] if a["family"] == "inet"] == ["10.244.1.0"]
    assert fdb(ns) == {M2: "192.0.2.11", M3: "198.18.0.13"}
    assert routes(ns)["10.244.3.0/24"]["dev"] == DEV


async def test_direct_routing_for_on_link_peers_only(ns, tmp_path) -> None:
    b = make(ns, tmp_path, DirectRouting=True)
    try:
        await b.prepare()
        await b.configure(LOCAL)
        await b.reconcile(LOCAL, peers(P2, P3))
    finally:
        await b.close()
    r = routes(ns)
    assert (r["10.244.2.0/24"]["gateway"], r["10.244.2.0/24"]["dev"]) == ("192.0.2.11", "ul0")
    assert r["10.244.2.0/24"]["flags"] == []
    assert (r["10.244.3.0/24"]["gateway"], r["10.244.3.0/24"]["dev"]) == ("10.244.3.0", DEV)
    assert fdb(ns) == {M3: "198.18.0.13"} and arp(ns) == {"10.244.3.0": M3}


async def test_direct_routing_asks_the_kernel_on_full_passes_and_for_new_peers(
    ns, tmp_path
) -> None:
    """Event passes reuse the on-link verdicts of the last full pass (no `route get` per
    peer per event) but ask for a new peer's address; a full pass asks again."""
    b = make(ns, tmp_path, DirectRouting=True)
    p4 = peer("10.244.4.0/24", "192.0.2.14", "0a:00:00:00:00:04")
    try:
        await b.prepare()
        await b.configure(LOCAL)
        await b.reconcile(LOCAL, peers(P2), full=True)
        assert routes(ns)["10.244.2.0/24"]["dev"] == "ul0"
        # P2's address now goes through a router: not on-link any more
        ip(ns, "route", "add", "192.0.2.11/32", "via", "192.0.2.1", "dev", "ul0")
        await b.reconcile(LOCAL, peers(P2, p4), full=False)
        r = routes(ns)
        assert r["10.244.2.0/24"]["dev"] == "ul0"  # the last full pass's verdict
        assert (r["10.244.4.0/24"]["gateway"], r["10.244.4.0/24"]["dev"]) == ("192.0.2.14", "ul0")
        await b.reconcile(LOCAL, peers(P2, p4), full=True)
        r = routes(ns)
        assert (r["10.244.2.0/24"]["gateway"], r["10.244.2.0/24"]["dev"]) == ("10.244.2.0", DEV)
        assert fdb(ns) == {M2: "192.0.2.11"} and arp(ns) == {"10.244.2.0": M2}
        assert r["10.244.4.0/24"]["dev"] == "ul0"
    finally:
        await b.close()


async def test_intact_tells_when_the_device_is_gone(ns, backend) -> None:
    assert await backend.intact()
    ip(ns, "link", "set", DEV, "down")  # its routes are flushed with it
    assert not await backend.intact()
    await backend.reconcile(LOCAL, peers(), full=False)
    assert await backend.intact()
    ip(ns, "link", "del", DEV)
    assert not await backend.intact()
    await backend.reconcile(LOCAL, peers(P2), full=False)  # heals, and replays the peers
    assert await backend.intact()
    assert fdb(ns) == {M2: "192.0.2.11"} and arp(ns) == {"10.244.2.0": M2}


async def test_dumps_list_only_permanent_unicast_entries(ns, backend) -> None:
    index = link(ns)["ifindex"]
    run("bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", DEV, "dst", "192.0.2.99")
    run("bridge", "-n", ns, "fdb", "add", M2, "dev", DEV, "dst", "192.0.2.11")
    run("bridge", "-n", ns, "fdb", "add", M3, "dev", DEV, "dst", "192.0.2.12", "dynamic")
    ip(ns, "neigh", "add", "10.244.2.0", "lladdr", M2, "dev", DEV, "nud", "permanent")
    ip(ns, "neigh", "add", "10.244.4.0", "lladdr", M3, "dev", DEV, "nud", "stale")
    rtnl = Rtnl(ns)
    try:
        assert await rtnl.dump_fdb(index) == {Fdb(index, M2, IPv4Address("192.0.2.11"))}
        assert await rtnl.dump_neighs(index) == {Neigh(index, IPv4Address("10.244.2.0"), M2)}
    finally:
        rtnl.close()


async def test_bad_option_is_refused_before_touching_the_kernel(ns, tmp_path) -> None:
    b = make(ns, tmp_path, VNI="1")
    with pytest.raises(ConfigError, match="Backend.VNI"):
        await b.prepare()
    assert DEV not in ip(ns, "link", "show")


async def test_v4_only_config_creates_no_ipv6_device(ns, backend) -> None:
    await backend.reconcile(LOCAL, peers(P2))
    assert DEV6 not in ip(ns, "link", "show")
    assert backend.mtu == 1450 and routes6(ns) == {}


# -- dual-stack: the second device flannel-v6.1 ----------------------------------------------
DEV6 = "flannel-v6.1"
PUBLIC_IP6 = IPv6Address("2001:db8::10")
MAC6 = vtep_mac(PUBLIC_IP6, 1)
N6 = "fd00:10:244:{}::"
LOCAL6 = Lease(
    IPv4Network("10.244.1.0/24"),
    LeaseAttrs(
        PUBLIC_IP, "vxlan", {"VNI": 1, "VtepMAC": MAC}, PUBLIC_IP6, {"VNI": 1, "VtepMAC": MAC6}
    ),
    ipv6_subnet=IPv6Network(N6.format(1) + "/64"),
)
M2_6, M3_6 = "0a:00:00:00:06:02", "0a:00:00:00:06:03"


def peer6(n: int, public_ip: str, mac: str, public_ip6: str, mac6: str) -> Lease:
    data = {"VNI": 1, "VtepMAC": mac}
    return Lease(
        IPv4Network(f"10.244.{n}.0/24"),
        LeaseAttrs(IPv4Address(public_ip), "vxlan", data, IPv6Address(public_ip6),
                   {"VNI": 1, "VtepMAC": mac6}),
        ipv6_subnet=IPv6Network(N6.format(n) + "/64"),
    )  # fmt: skip


Q2 = peer6(2, "192.0.2.11", M2, "2001:db8::11", M2_6)  # IPv6 underlay on-link
Q3 = peer6(3, "198.18.0.13", M3, "2001:db8:ff::13", M3_6)  # behind the IPv6 router


def fdb6(ns: str) -> dict[str, str]:
    entries = json.loads(run("bridge", "-n", ns, "-j", "fdb", "show", "dev", DEV6))
    return {e["mac"]: e.get("dst") for e in entries if "permanent" in e.get("state", "")}


def ndp(ns: str) -> dict[str, str]:
    entries = json.loads(ip(ns, "-6", "-j", "neigh", "show", "dev", DEV6))
    return {e["dst"]: e["lladdr"] for e in entries if "PERMANENT" in e.get("state", [])}


def routes6(ns: str) -> dict[str, dict]:
    listed = json.loads(ip(ns, "-6", "-j", "route", "show", "table", "main"))
    return {r["dst"]: r for r in listed if r.get("protocol") == str(netlink.ROUTE_PROTOCOL)}


def addrs6(ns: str, name: str = DEV6) -> set[tuple[str, int]]:
    dev = json.loads(ip(ns, "-j", "addr", "show", "dev", name))[0]
    return {(a["local"], a["prefixlen"]) for a in dev["addr_info"] if a["family"] == "inet6"}


def make6(
    ns: str,
    tmp_path: Path,
    public: IPv4Address = PUBLIC_IP,
    public6: IPv6Address = PUBLIC_IP6,
    **options: object,
) -> VxlanBackend:
    ext = ExternalInterface(
        "ul0", link(ns, "ul0")["ifindex"], public, public, 1500,
        iface_addr6=public6, ext_addr6=public6,
    )  # fmt: skip
    doc = {
        "Network": "10.244.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": "fd00:10:244::/56",
        "Backend": {"Type": "vxlan", **options},
    }
    config = parse_config(json.dumps(doc))
    return VxlanBackend(BackendContext(ext, config, tmp_path, config.backend), netns=ns)


@pytest.fixture
async def backend6(ns, tmp_path: Path):
    b = make6(ns, tmp_path)
    try:
        await b.prepare()
        await b.configure(LOCAL6)
        yield b
    finally:
        await b.close()


async def test_dual_stack_prepare_creates_the_ipv6_device_the_reference_way(ns, tmp_path) -> None:
    b = make6(ns, tmp_path)
    try:
        attrs = await b.prepare()
    finally:
        await b.close()
    assert attrs == LOCAL6.attrs
    assert attrs.encode() == (
        b'{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"' + MAC.encode() + b'"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"' + MAC6.encode() + b'"}}'
    )
    dev = link(ns, DEV6)
    info = dev["linkinfo"]["info_data"]
    assert MAC6 != MAC and dev["address"] == MAC6
    assert dev["mtu"] == 1430 == b.mtu  # FLANNEL_MTU fits both devices
    assert (info["id"], info["local6"], info["link"], info["port"]) == (
        1,
        "2001:db8::10",
        "ul0",
        8472,
    )
    assert info["learning"] is False and "gbp" not in info and "group6" not in info
    v4 = link(ns)
    assert (v4["address"], v4["mtu"]) == (MAC, 1450)  # the IPv4 device as without IPv6


async def test_dual_stack_compatible_devices_are_reused(ns, backend6, tmp_path) -> None:
    index = link(ns, DEV6)["ifindex"]
    await backend6.reconcile(LOCAL6, peers(Q2))
    again = make6(ns, tmp_path)
    try:
        assert (await again.prepare()).backend_v6_data == {"VNI": 1, "VtepMAC": MAC6}
        await again.configure(LOCAL6)
        result = await again.reconcile(LOCAL6, peers(Q2))
    finally:
        await again.close()
    assert link(ns, DEV6)["ifindex"] == index and not result.changed


async def test_dual_stack_incompatible_ipv6_device_is_replaced(ns, tmp_path) -> None:
    # An IPv4 device under the IPv6 name, and one with the wrong IPv6 source address.
    for local in ("192.0.2.10", "2001:db8::99"):
        ip(ns, "link", "add", DEV6, "type", "vxlan", "id", "1", "local", local,
           "dev", "ul0", "dstport", "8472")  # fmt: skip
        index = link(ns, DEV6)["ifindex"]
        b = make6(ns, tmp_path)
        try:
            await b.prepare()
        finally:
            await b.close()
        dev = link(ns, DEV6)
        assert dev["ifindex"] != index and dev["address"] == MAC6
        assert dev["linkinfo"]["info_data"].get("local6") == "2001:db8::10"
        ip(ns, "link", "del", DEV6)


async def test_dual_stack_configure_sets_the_ipv6_address(ns, backend6) -> None:
    ip(ns, "addr", "add", "fd00:10:244:9::/128", "dev", DEV6, "nodad")  # an old lease's
    ip(ns, "addr", "add", "fd00:99::1/128", "dev", DEV6, "nodad")  # not IPv6Network: kept
    await backend6.configure(LOCAL6)
    have = {a for a in addrs6(ns) if not a[0].startswith("fe80:")}
    assert have == {("fd00:10:244:1::", 128), ("fd00:99::1", 128)}
    assert "UP" in link(ns, DEV6)["flags"]
    # added without duplicate address detection: usable at once, never tentative
    assert "fd00:10:244:1::" not in ip(ns, "-6", "addr", "show", "dev", DEV6, "tentative")
    v4 = json.loads(ip(ns, "-j", "addr", "show", "dev", DEV))[0]
    assert [a["local"] for a in v4["addr_info"] if a["family"] == "inet"] == ["10.244.1.0"]


async def test_dual_stack_peers_get_ndp_fdb_and_onlink_route(ns, backend6) -> None:
    result = await backend6.reconcile(LOCAL6, peers(Q2, Q3))
    assert result.added == {"arp": 4, "fdb": 4, "route": 4} and not result.failed
    assert fdb(ns) == {M2: "192.0.2.11", M3: "198.18.0.13"}
    assert fdb6(ns) == {M2_6: "2001:db8::11", M3_6: "2001:db8:ff::13"}
    assert ndp(ns) == {N6.format(2): M2_6, N6.format(3): M3_6}
    r = routes6(ns)
    assert set(r) == {N6.format(2) + "/64", N6.format(3) + "/64"}
    r2 = r[N6.format(2) + "/64"]
    assert (r2["gateway"], r2["dev"], r2["flags"]) == (N6.format(2), DEV6, ["onlink"])
    assert routes(ns)["10.244.2.0/24"]["dev"] == DEV
    assert not (await backend6.reconcile(LOCAL6, peers(Q2, Q3))).changed


async def test_dual_stack_peer_without_ipv6_data_gets_ipv4_only(ns, backend6) -> None:
    bare = Lease(Q3.subnet, LeaseAttrs(Q3.attrs.public_ip, "vxlan", Q3.attrs.backend_data))
    result = await backend6.reconcile(LOCAL6, peers(Q2, bare))
    assert result.added == {"arp": 3, "fdb": 3, "route": 3}
    assert fdb6(ns) == {M2_6: "2001:db8::11"} and fdb(ns) == {M2: "192.0.2.11", M3: "198.18.0.13"}


async def test_dual_stack_hand_deleted_entries_are_restored(ns, backend6) -> None:
    await backend6.reconcile(LOCAL6, peers(Q2, Q3))
    run("bridge", "-n", ns, "fdb", "del", M2_6, "dev", DEV6, "dst", "2001:db8::11")
    ip(ns, "-6", "neigh", "del", N6.format(3), "dev", DEV6)
    ip(ns, "-6", "route", "del", N6.format(3) + "/64")
    missing = await backend6.inspect(LOCAL6, peers(Q2, Q3))
    assert missing == {
        Q2.subnet: [f"{M2_6} dst 2001:db8::11 dev {DEV6}"],
        Q3.subnet: [
            f"{N6.format(3)} lladdr {M3_6} dev {DEV6}",
            f"{N6.format(3)}/64 via {N6.format(3)} dev {DEV6} onlink",
        ],
    }
    result = await backend6.reconcile(LOCAL6, peers(Q2, Q3))
    assert result.added == {"arp": 1, "fdb": 1, "route": 1} and not result.removed
    assert result.repaired == result.added
    assert fdb6(ns) == {M2_6: "2001:db8::11", M3_6: "2001:db8:ff::13"}
    assert ndp(ns)[N6.format(3)] == M3_6 and N6.format(3) + "/64" in routes6(ns)


async def test_dual_stack_removed_peer_and_stale_entries_are_cleaned(ns, backend6) -> None:
    await backend6.reconcile(LOCAL6, peers(Q2, Q3))
    # Left by an earlier run for a peer that vanished while the agent was down.
    run(
        "bridge", "-n", ns, "fdb", "append", "0a:00:00:00:06:07", "dev", DEV6, "dst", "2001:db8::17"
    )
    result = await backend6.reconcile(LOCAL6, peers(Q2))
    assert result.removed == {"arp": 2, "fdb": 3, "route": 2} and not result.added
    assert fdb6(ns) == {M2_6: "2001:db8::11"} and ndp(ns) == {N6.format(2): M2_6}
    assert set(routes6(ns)) == {N6.format(2) + "/64"}


async def test_dual_stack_ipv6_mac_change_replaces_ndp_and_drops_the_old_fdb_entry(
    ns, backend6
) -> None:
    await backend6.reconcile(LOCAL6, peers(Q2))
    moved = peer6(2, "192.0.2.11", M2, "2001:db8::11", "0a:00:00:00:06:22")
    result = await backend6.reconcile(LOCAL6, peers(moved))
    assert result.removed == {"fdb": 1} and result.added == {"arp": 1, "fdb": 1}
    assert fdb6(ns) == {"0a:00:00:00:06:22": "2001:db8::11"}
    assert ndp(ns) == {N6.format(2): "0a:00:00:00:06:22"} and fdb(ns) == {M2: "192.0.2.11"}


async def test_dual_stack_deleted_ipv6_device_is_recreated_and_replayed(ns, backend6) -> None:
    await backend6.reconcile(LOCAL6, peers(Q2, Q3))
    ip(ns, "link", "del", DEV6)
    assert routes6(ns) == {} and not await backend6.intact()
    result = await backend6.reconcile(LOCAL6, peers(Q2, Q3), full=False)
    assert result.added == {"arp": 2, "fdb": 2, "route": 2}  # the IPv4 side was left alone
    assert await backend6.intact()
    dev = link(ns, DEV6)
    assert (dev["address"], dev["mtu"]) == (MAC6, 1430) and "UP" in dev["flags"]
    assert ("fd00:10:244:1::", 128) in addrs6(ns)
    assert fdb6(ns) == {M2_6: "2001:db8::11", M3_6: "2001:db8:ff::13"}
    assert routes6(ns)[N6.format(3) + "/64"]["dev"] == DEV6


async def test_dual_stack_intact_checks_both_devices(ns, backend6) -> None:
    assert await backend6.intact()
    ip(ns, "link", "set", DEV6, "down")
    assert not await backend6.intact()
    await backend6.reconcile(LOCAL6, peers(), full=False)
    assert await backend6.intact()
    ip(ns, "link", "set", DEV, "down")
    assert not await backend6.intact()


async def test_dual_stack_direct_routing_for_on_link_peers(ns, tmp_path) -> None:
    b = make6(ns, tmp_path, DirectRouting=True)
    try:
        await b.prepare()
        await b.configure(LOCAL6)
        await b.reconcile(LOCAL6, peers(Q2, Q3))
    finally:
        await b.close()
    r = routes6(ns)
    r2, r3 = r[N6.format(2) + "/64"], r[N6.format(3) + "/64"]
    assert (r2["gateway"], r2["dev"], r2["flags"]) == ("2001:db8::11", "ul0", [])
    assert (r3["gateway"], r3["dev"]) == (N6.format(3), DEV6)
    assert fdb6(ns) == {M3_6: "2001:db8:ff::13"} and ndp(ns) == {N6.format(3): M3_6}
    assert routes(ns)["10.244.2.0/24"]["dev"] == "ul0"


async def test_dual_stack_ipv6_dumps_list_only_permanent_unicast_entries(ns, backend6) -> None:
    index = link(ns, DEV6)["ifindex"]
    run(
        "bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", DEV6, "dst", "2001:db8::99"
    )
    run("bridge", "-n", ns, "fdb", "add", M2_6, "dev", DEV6, "dst", "2001:db8::11")
    ip(ns, "-6", "neigh", "add", N6.format(2), "lladdr", M2_6, "dev", DEV6, "nud", "permanent")
    ip(ns, "-6", "neigh", "add", N6.format(4), "lladdr", M3_6, "dev", DEV6, "nud", "stale")
    rtnl = Rtnl(ns)
    try:
        assert await rtnl.dump_fdb(index) == {Fdb(index, M2_6, IPv6Address("2001:db8::11"))}
        assert await rtnl.dump_neighs(index, version=6) == {
            Neigh(index, IPv6Address(N6.format(2)), M2_6)
        }
    finally:
        rtnl.close()


def reassembled(ns: str) -> int:
    """How many IPv6 packets the namespace had to reassemble from fragments."""
    counters = run("ip", "netns", "exec", ns, "cat", "/proc/net/snmp6").split("\n")
    return next(int(line.split()[1]) for line in counters if line.startswith("Ip6ReasmReqds"))


@pytest.fixture
def two_nodes():
    """Two namespaces joined by a veth pair `ul0`—`ul0`: 192.0.2.10 and 2001:db8::10 in the
    first, .11 and ::11 in the second."""
    names = [f"fltest-{secrets.token_hex(4)}" for _ in range(2)]
    try:
        for name in names:
            run("ip", "netns", "add", name)
        a, b = names
        ip(a, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", b)
        for name, host in zip(names, ("10", "11"), strict=True):
            ip(name, "addr", "add", f"192.0.2.{host}/24", "dev", "ul0")
            ip(name, "addr", "add", f"2001:db8::{host}/64", "dev", "ul0", "nodad")
            ip(name, "link", "set", "dev", "ul0", "up")
            ip(name, "link", "set", "dev", "lo", "up")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


async def test_dual_stack_packets_cross_both_devices_at_the_advertised_mtu(
    two_nodes, tmp_path
) -> None:
    """Real packets between two nodes: IPv4 through flannel.1, IPv6 through flannel-v6.1, and
    an IPv6 packet of FLANNEL_MTU bytes (1430) crossing the 1500-byte underlay unfragmented."""
    a, b = two_nodes
    ip4, ip6 = IPv4Address("192.0.2.11"), IPv6Address("2001:db8::11")
    node_a, node_b = make6(a, tmp_path), make6(b, tmp_path, ip4, ip6)
    try:
        lease_a = Lease(LOCAL6.subnet, await node_a.prepare(), ipv6_subnet=LOCAL6.ipv6_subnet)
        lease_b = Lease(
            IPv4Network("10.244.2.0/24"),
            await node_b.prepare(),
            ipv6_subnet=IPv6Network(N6.format(2) + "/64"),
        )
        assert lease_b.attrs.backend_v6_data == {"VNI": 1, "VtepMAC": vtep_mac(ip6, 1)}
        for node, mine, theirs in ((node_a, lease_a, lease_b), (node_b, lease_b, lease_a)):
            await node.configure(mine)
            result = await node.reconcile(mine, peers(theirs))
            assert result.added == {"arp": 2, "fdb": 2, "route": 2}
    finally:
        await node_a.close()
        await node_b.close()
    for name in two_nodes:  # the kernel's duplicate address detection: about a second
        deadline = time.monotonic() + 10
        while ip(name, "-6", "addr", "show", "dev", DEV6, "tentative").strip():
            assert time.monotonic() < deadline, "the IPv6 address stays tentative"
            time.sleep(0.1)
    ping = ("ip", "netns", "exec", a, "ping", "-c", "1", "-W", "2")
    run(*ping, "-I", "10.244.1.0", "10.244.2.0")
    run(*ping, "-6", "-I", N6.format(1), N6.format(2))
    big = (*ping, "-6", "-I", N6.format(1), "-M", "do", "-s")
    run(*big, "1382", N6.format(2))  # 1430 bytes: an outer packet of exactly 1500
    assert reassembled(b) == 0
    with pytest.raises(subprocess.CalledProcessError):  # the kernel's limit too: not 1450
        ip(a, "link", "set", "dev", DEV6, "mtu", "1431")


async def test_a_device_of_a_family_the_network_dropped_is_deleted(ns, backend6, tmp_path) -> None:
    """Dual-stack, then IPv6-only (flannel.1 goes, flannel-v6.1 is kept as it was), then
    IPv4-only (flannel-v6.1 goes): no device of a family the config no longer has is left
    behind carrying stale entries."""
    await backend6.reconcile(LOCAL6, peers(Q2))
    index6 = link(ns, DEV6)["ifindex"]
    ext = backend6.ctx.ext
    v6only = parse_config(
        '{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56", '
        '"Backend": {"Type": "vxlan"}}'
    )
    b = VxlanBackend(BackendContext(ext, v6only, tmp_path, v6only.backend), netns=ns)
    try:
        attrs = await b.prepare()
    finally:
        await b.close()
    names = {d["ifname"] for d in json.loads(ip(ns, "-j", "link", "show"))}
    assert DEV not in names and link(ns, DEV6)["ifindex"] == index6
    assert attrs.backend_data is None and str(attrs.public_ip) == "0.0.0.0"
    v4only = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    b = VxlanBackend(BackendContext(ext, v4only, tmp_path, v4only.backend), netns=ns)
    try:
        await b.prepare()
    finally:
        await b.close()
    names = {d["ifname"] for d in json.loads(ip(ns, "-j", "link", "show"))}
    assert DEV in names and DEV6 not in names
