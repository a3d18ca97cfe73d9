"""vxlan without a kernel: options, the stable VTEP MAC, the pure plan (peer leases to ARP,
FDB and route entries, DirectRouting, skipped peers) and the diff it feeds; in dual-stack the
IPv6 half of the plan (NDP, FDB and route entries on the IPv6 device) and what prepare()
refuses."""

import hashlib
import json
import re
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from backends import get_backend
from backends.base import BackendContext, BackendError
from backends.reconcile import Fdb, Neigh, Route, diff
from backends.vxlan import VxlanBackend, mismatches
from backends.vxlanplan import VxlanOptions, parse_options, peer_mac6, plan, vtep_mac
from flanneld.core.config import ConfigError, parse_config
from flanneld.core.interfaces import ExternalInterface
from flanneld.core.lease import Lease, LeaseAttrs

VX, EXT = 5, 2
# Backends built here point at a namespace that does not exist: a prepare() that reached the
# kernel by mistake fails (FileNotFoundError) instead of creating a device in the host's own.
NO_NETNS = "flannel-unit-tests-touch-no-kernel"
M1, M2, M3 = "0a:00:00:00:00:01", "0a:00:00:00:00:02", "0a:00:00:00:00:03"


def lease(
    net: str, ip: str, data: object = None, backend: str = "vxlan", created: int = 0
) -> Lease:
    return Lease(
        IPv4Network(net), LeaseAttrs(IPv4Address(ip), backend, data), create_revision=created
    )


def vx(net: str, ip: str, mac: str, created: int = 0) -> Lease:
    return lease(net, ip, {"VNI": 1, "VtepMAC": mac}, created=created)


def entries(net: str, ip: str, mac: str) -> set:
    """What a peer reached through the VXLAN device gets."""
    gw = IPv4Network(net).network_address
    return {
        Neigh(VX, gw, mac),
        Fdb(VX, mac, IPv4Address(ip)),
        Route(IPv4Network(net), gw, VX, onlink=True),
    }


def direct_route(net: str, ip: str) -> Route:
    return Route(IPv4Network(net), IPv4Address(ip), EXT)


LOCAL = vx("10.244.1.0/24", "192.0.2.10", M1)
P2 = vx("10.244.2.0/24", "192.0.2.11", M2)
P3 = vx("10.244.3.0/24", "198.18.0.13", M3)

CASES = [
    # name, peers, direct, entries, warning fragments (one list per skipped peer)
    ("no peers", [], None, set(), []),
    ("two peers", [P2, P3], None,
     entries("10.244.2.0/24", "192.0.2.11", M2) | entries("10.244.3.0/24", "198.18.0.13", M3), []),
    ("MAC upper case in the record", [vx("10.244.2.0/24", "192.0.2.11", M2.upper())], None,
     entries("10.244.2.0/24", "192.0.2.11", M2), []),
    ("BackendData keys in any case", [lease("10.244.2.0/24", "192.0.2.11", {"vtepmac": M2})],
     None, entries("10.244.2.0/24", "192.0.2.11", M2), []),
    ("DirectRouting: on-link peer gets a plain route", [P2, P3], {IPv4Address("192.0.2.11")},
     {direct_route("10.244.2.0/24", "192.0.2.11")} | entries("10.244.3.0/24", "198.18.0.13", M3),
     []),
    ("DirectRouting on, nobody on-link", [P2], set(),
     entries("10.244.2.0/24", "192.0.2.11", M2), []),
    ("foreign backend skipped", [P2, lease("10.244.4.0/24", "192.0.2.14", None, "host-gw")],
     None, entries("10.244.2.0/24", "192.0.2.11", M2), [["10.244.4.0/24", "'host-gw'"]]),
    ("own subnet skipped", [LOCAL], None, set(), [["10.244.1.0/24", "our subnet"]]),
    ("own PublicIP skipped", [vx("10.244.5.0/24", "192.0.2.10", M3)], None, set(),
     [["10.244.5.0/24", "PublicIP is ours"]]),
    ("no BackendData", [lease("10.244.4.0/24", "192.0.2.14")], None, set(),
     [["10.244.4.0/24", "BackendData null"]]),
    ("BackendData not an object", [lease("10.244.4.0/24", "192.0.2.14", [M2])], None, set(),
     [["10.244.4.0/24", "no valid unicast VtepMAC"]]),
    ("VtepMAC missing", [lease("10.244.4.0/24", "192.0.2.14", {"VNI": 1})], None, set(),
     [["10.244.4.0/24", "VtepMAC"]]),
    ("VtepMAC malformed", [vx("10.244.4.0/24", "192.0.2.14", "0a:00:00:00:02")], None, set(),
     [["10.244.4.0/24", "VtepMAC"]]),
    ("VtepMAC not a string", [lease("10.244.4.0/24", "192.0.2.14", {"VtepMAC": 7})], None,
     set(), [["10.244.4.0/24", "VtepMAC"]]),
    ("VtepMAC multicast", [vx("10.244.4.0/24", "192.0.2.14", "01:00:5e:00:00:01")], None,
     set(), [["10.244.4.0/24", "VtepMAC"]]),
    ("VtepMAC all zeros", [vx("10.244.4.0/24", "192.0.2.14", "00:00:00:00:00:00")], None,
     set(), [["10.244.4.0/24", "VtepMAC"]]),
    ("VtepMAC of two peers created together: the lower subnet wins",
     [vx("10.244.4.0/24", "192.0.2.14", M2), P2], None,
     entries("10.244.2.0/24", "192.0.2.11", M2), [["10.244.4.0/24", "also that of 10.244.2.0/24"]]),
    ("a later record copying a peer's VtepMAC from a lower subnet does not take it",
     [vx("10.244.2.0/24", "192.0.2.66", M3, created=90), vx("10.244.3.0/24", "198.18.0.13", M3, 7)],
     None, entries("10.244.3.0/24", "198.18.0.13", M3),
     [["10.244.2.0/24", "also that of 10.244.3.0/24"]]),
    ("VtepMAC equal to ours", [vx("10.244.4.0/24", "192.0.2.14", M1)], None, set(),
     [["10.244.4.0/24", "is also ours"]]),
    ("bad peers skipped one warning each",
     [P2, lease("10.244.4.0/24", "192.0.2.14", None, "udp"), lease("10.244.6.0/24", "192.0.2.16")],
     None, entries("10.244.2.0/24", "192.0.2.11", M2), [["10.244.4.0/24"], ["10.244.6.0/24"]]),
]  # fmt: skip


@pytest.mark.parametrize(
    "peers, direct, want, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(peers, direct, want, fragments) -> None:
    got, warnings = plan(LOCAL, {p.subnet: p for p in peers}, VX, direct, EXT)
    assert got == want
    assert len(warnings) == len(fragments)
    for warning, parts in zip(warnings, fragments, strict=True):
        for part in parts:
            assert part in warning


def test_reference_record_is_programmed() -> None:
    raw = (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    ref = Lease(IPv4Network("10.5.52.0/24"), LeaseAttrs.decode(raw))
    got, warnings = plan(LOCAL, {ref.subnet: ref}, VX, None, EXT)
    assert not warnings
    assert got == entries("10.5.52.0/24", "192.168.64.3", "c6:d2:32:6f:8f:44")


def test_mac_change_removes_the_old_fdb_entry_and_replaces_arp() -> None:
    before, _ = plan(LOCAL, {P2.subnet: P2}, VX, None, EXT)
    moved = vx("10.244.2.0/24", "192.0.2.11", "0a:00:00:00:00:22")
    after, _ = plan(LOCAL, {moved.subnet: moved}, VX, None, EXT)
    d = diff(after, before)
    assert d.remove == {Fdb(VX, M2, IPv4Address("192.0.2.11"))}
    assert d.upsert == {
        Neigh(VX, IPv4Address("10.244.2.0"), "0a:00:00:00:00:22"),
        Fdb(VX, "0a:00:00:00:00:22", IPv4Address("192.0.2.11")),
    }
    assert [e.kind for e in d.ordered_upserts()] == ["arp", "fdb"]


def test_peer_becoming_direct_swaps_its_entries() -> None:
    tunnelled, _ = plan(LOCAL, {P2.subnet: P2}, VX, set(), EXT)
    direct, _ = plan(LOCAL, {P2.subnet: P2}, VX, {IPv4Address("192.0.2.11")}, EXT)
    d = diff(direct, tunnelled)
    assert d.upsert == {direct_route("10.244.2.0/24", "192.0.2.11")}
    assert {e.kind for e in d.remove} == {"arp", "fdb"}


def test_removed_peer_is_removed_route_first() -> None:
    actual, _ = plan(LOCAL, {P2.subnet: P2}, VX, None, EXT)
    assert [e.kind for e in diff(set(), actual).ordered_removes()] == ["route", "fdb", "arp"]


OPTION_CASES = [
    ("defaults", {}, VxlanOptions()),
    ("reference zeros mean defaults", {"Port": 0, "MTU": 0}, VxlanOptions()),
    ("all set, keys in any case",
     {"vni": 7, "PORT": 4789, "gbp": True, "Learning": True, "directrouting": True, "Mtu": 9000},
     VxlanOptions(7, 4789, True, True, True, 9000)),
    ("VNI 0 allowed", {"VNI": 0}, VxlanOptions(vni=0)),
]  # fmt: skip


@pytest.mark.parametrize(
    "options, want", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES]
)
def test_parse_options(options, want) -> None:
    assert parse_options({"Type": "vxlan", **options}) == want


def test_device_name() -> None:
    assert VxlanOptions(vni=42).device == "flannel.42"


BAD_OPTIONS = [
    ({"VNI": "1"}, 'Backend.VNI must be an integer from 0 to 9999999 (got "1")'),
    ({"VNI": 10_000_000}, "Backend.VNI must be an integer from 0 to 9999999"),
    ({"VNI": -1}, "Backend.VNI"),
    ({"VNI": True}, "Backend.VNI"),
    ({"Port": 70000}, "Backend.Port must be an integer from 0 to 65535"),
    ({"MTU": 1400.5}, "Backend.MTU must be an integer"),
    ({"GBP": "yes"}, 'Backend.GBP must be true or false (got "yes")'),
    ({"Learning": 1}, "Backend.Learning must be true or false"),
    ({"DirectRouting": None}, "Backend.DirectRouting must be true or false (got null)"),
]


@pytest.mark.parametrize("options, message", BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_errors(options, message) -> None:
    with pytest.raises(ConfigError) as err:
        parse_options(options)
    text = str(err.value)
    assert message in text and "\n" not in text and "; " in text


def test_vtep_mac_is_stable_unicast_and_locally_administered() -> None:
    mac = vtep_mac(IPv4Address("192.0.2.11"), 1)
    assert mac == vtep_mac(IPv4Address("192.0.2.11"), 1)
    first = int(mac[:2], 16)
    assert first & 0x01 == 0 and first & 0x02 == 0x02
    assert len(mac.split(":")) == 6 and mac == mac.lower()
    others = {vtep_mac(IPv4Address("192.0.2.12"), 1), vtep_mac(IPv4Address("192.0.2.11"), 2)}
    assert mac not in others and len(others) == 2


def test_mismatches_name_each_differing_attribute() -> None:
    want = {"kind": "vxlan", "vxlan_id": 1, "vxlan_port": 8472}
    assert mismatches(dict(want), want) == []
    assert mismatches({**want, "vxlan_port": 4789}, want) == ["vxlan_port 4789 (want 8472)"]


def backend(mtu: int = 1500, **options: object) -> VxlanBackend:
    ext = ExternalInterface("eth0", EXT, IPv4Address("192.0.2.10"), IPv4Address("192.0.2.10"), mtu)
    config = parse_config(
        json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", **options}})
    )
    return VxlanBackend(
        BackendContext(ext, config, Path("/nonexistent"), config.backend), netns=NO_NETNS
    )


def test_mtu_is_the_base_minus_50() -> None:
    assert backend().mtu == 1450
    assert backend(mtu=9000).mtu == 8950


async def test_prepare_refuses_bad_options_and_tiny_mtu() -> None:
    with pytest.raises(ConfigError, match="Backend.Port"):
        await backend(Port="8472").prepare()
    with pytest.raises(ConfigError, match="at least 118"):
        await backend(MTU=100).prepare()
    with pytest.raises(BackendError, match="MTU of eth0"):
        await backend(mtu=100).prepare()


def test_registered_under_its_type_name() -> None:
    assert get_backend("VXLAN") is VxlanBackend


def test_owned_devices_include_the_ipv6_one() -> None:
    patterns = [re.compile(name) for kind, name in VxlanBackend.owned_devices() if kind == "vxlan"]
    owned = {n for n in ("flannel.1", "flannel-v6.1", "flannel-v6.42", "flannel-v6.x", "flannel")
             if any(p.fullmatch(n) for p in patterns)}  # fmt: skip
    assert owned == {"flannel.1", "flannel-v6.1", "flannel-v6.42"}


# -- dual-stack: the IPv6 half of the plan -----------------------------------------------------
VX6 = 6
M6_1, M6_2, M6_3 = "0a:00:00:00:06:01", "0a:00:00:00:06:02", "0a:00:00:00:06:03"
UNSET = object()


def net6(n: int) -> IPv6Network:
    return IPv6Network(f"fd00:10:244:{n}::/64")


def dual(
    n: int,
    ip: str,
    mac: str,
    ip6: str | None,
    mac6: object = UNSET,
    created: int = 0,
    subnet6: IPv6Network | None | object = UNSET,
) -> Lease:
    """A dual-stack lease for 10.244.<n>.0/24 and fd00:10:244:<n>::/64; `mac6` a VtepMAC, or
    any BackendV6Data when not a string."""
    data6 = {"VNI": 1, "VtepMAC": mac6} if isinstance(mac6, str) else mac6
    attrs = LeaseAttrs(
        IPv4Address(ip),
        "vxlan",
        {"VNI": 1, "VtepMAC": mac},
        IPv6Address(ip6) if ip6 else None,
        None if data6 is UNSET else data6,
    )
    six = net6(n) if subnet6 is UNSET else subnet6
    return Lease(IPv4Network(f"10.244.{n}.0/24"), attrs, create_revision=created, ipv6_subnet=six)


def entries6(n: int, ip6: str, mac6: str) -> set:
    """What a peer's IPv6 subnet reached through the IPv6 device gets."""
    gw = net6(n).network_address
    return {
        Neigh(VX6, gw, mac6),
        Fdb(VX6, mac6, IPv6Address(ip6)),
        Route(net6(n), gw, VX6, onlink=True),
    }


LOCAL6 = dual(1, "192.0.2.10", M1, "2001:db8::10", M6_1)
Q2 = dual(2, "192.0.2.11", M2, "2001:db8::11", M6_2)
Q3 = dual(3, "198.18.0.13", M3, "2001:db8:ff::13", M6_3)
BOTH2 = entries("10.244.2.0/24", "192.0.2.11", M2) | entries6(2, "2001:db8::11", M6_2)
BOTH3 = entries("10.244.3.0/24", "198.18.0.13", M3) | entries6(3, "2001:db8:ff::13", M6_3)
V4_2, V4_3 = entries("10.244.2.0/24", "192.0.2.11", M2), entries("10.244.3.0/24", "198.18.0.13", M3)

HOSTGW6 = Lease(
    IPv4Network("10.244.4.0/24"),
    LeaseAttrs(IPv4Address("192.0.2.14"), "host-gw", None, IPv6Address("2001:db8::14")),
    ipv6_subnet=net6(4),
)

DUAL_CASES = [
    # name, peers, direct, entries, warning fragments (one list per warning)
    ("two dual-stack peers", [Q2, Q3], None, BOTH2 | BOTH3, []),
    ("a reference node: one MAC for both devices",
     [dual(2, "192.0.2.11", M2, "2001:db8::11", M2)], None,
     V4_2 | entries6(2, "2001:db8::11", M2), []),
    ("an IPv6 MAC equal to another peer's IPv4 MAC: other devices, no conflict",
     [Q2, dual(3, "198.18.0.13", M3, "2001:db8:ff::13", M2)], None,
     BOTH2 | V4_3 | entries6(3, "2001:db8:ff::13", M2), []),
    ("BackendV6Data keys in any case, MAC upper case",
     [dual(2, "192.0.2.11", M2, "2001:db8::11", {"vtepmac": M6_2.upper()})], None, BOTH2, []),
    ("a peer without an IPv6 subnet keeps IPv4",
     [Q2, dual(3, "198.18.0.13", M3, None, subnet6=None)], None, BOTH2 | V4_3,
     [["skipping the IPv6 subnet of peer lease 10.244.3.0/24", "no IPv6 subnet", "EnableIPv6"]]),
    ("an IPv6 subnet without PublicIPv6", [dual(3, "198.18.0.13", M3, None, M6_3)], None, V4_3,
     [["10.244.3.0/24 (PublicIPv6 none)", "no PublicIPv6"]]),
    ("no BackendV6Data", [dual(3, "198.18.0.13", M3, "2001:db8:ff::13")], None, V4_3,
     [["(PublicIPv6 2001:db8:ff::13)", "BackendV6Data null has no valid unicast VtepMAC"]]),
    ("BackendV6Data without VtepMAC",
     [dual(3, "198.18.0.13", M3, "2001:db8:ff::13", {"VNI": 1})], None, V4_3,
     [["10.244.3.0/24", "BackendV6Data", "VtepMAC"]]),
    ("IPv6 VtepMAC malformed", [dual(3, "198.18.0.13", M3, "2001:db8:ff::13", "0a:00:06:03")],
     None, V4_3, [["10.244.3.0/24", "VtepMAC"]]),
    ("IPv6 VtepMAC multicast",
     [dual(3, "198.18.0.13", M3, "2001:db8:ff::13", "33:33:00:00:00:01")], None, V4_3,
     [["10.244.3.0/24", "VtepMAC"]]),
    ("IPv6 VtepMAC all zeros",
     [dual(3, "198.18.0.13", M3, "2001:db8:ff::13", "00:00:00:00:00:00")], None, V4_3,
     [["10.244.3.0/24", "VtepMAC"]]),
    ("an IPv4 half skipped does not skip the IPv6 half",
     [dual(3, "198.18.0.13", "01:00:5e:00:00:01", "2001:db8:ff::13", M6_3)], None,
     entries6(3, "2001:db8:ff::13", M6_3),
     [["skipping peer lease 10.244.3.0/24 (PublicIP 198.18.0.13)", "BackendData"]]),
    ("PublicIPv6 equal to ours", [dual(3, "198.18.0.13", M3, "2001:db8::10", M6_3)], None, V4_3,
     [["10.244.3.0/24", "PublicIPv6 is ours"]]),
    ("IPv6 subnet equal to ours",
     [dual(3, "198.18.0.13", M3, "2001:db8:ff::13", M6_3, subnet6=net6(1))], None, V4_3,
     [["10.244.3.0/24", "our IPv6 subnet"]]),
    ("IPv6 VtepMAC equal to ours", [dual(3, "198.18.0.13", M3, "2001:db8:ff::13", M6_1)], None,
     V4_3, [["10.244.3.0/24", f"VtepMAC {M6_1} is also ours"]]),
    ("IPv6 VtepMAC of two peers created together: the lower subnet wins",
     [dual(4, "192.0.2.14", "0a:00:00:00:00:04", "2001:db8::14", M6_2), Q2], None,
     BOTH2 | entries("10.244.4.0/24", "192.0.2.14", "0a:00:00:00:00:04"),
     [["skipping the IPv6 subnet of peer lease 10.244.4.0/24", "also that of 10.244.2.0/24"]]),
    ("a later record copying a peer's IPv6 VtepMAC does not take it",
     [dual(2, "192.0.2.11", M2, "2001:db8::66", M6_3, created=90),
      dual(3, "198.18.0.13", M3, "2001:db8:ff::13", M6_3, created=7)], None,
     V4_2 | BOTH3, [["10.244.2.0/24", "also that of 10.244.3.0/24"]]),
    ("own subnet, other backend type: skipped once for both families",
     [LOCAL6, HOSTGW6], None, set(),
     [["10.244.1.0/24", "our subnet"], ["10.244.4.0/24", "'host-gw'"]]),
    ("DirectRouting: an on-link PublicIPv6 gets a plain IPv6 route", [Q2, Q3],
     {IPv6Address("2001:db8::11")},
     V4_2 | {Route(net6(2), IPv6Address("2001:db8::11"), EXT)} | BOTH3, []),
    ("DirectRouting: both families on-link",
     [Q2], {IPv4Address("192.0.2.11"), IPv6Address("2001:db8::11")},
     {direct_route("10.244.2.0/24", "192.0.2.11"),
      Route(net6(2), IPv6Address("2001:db8::11"), EXT)}, []),
    ("DirectRouting needs a valid IPv6 VtepMAC as IPv4 does",
     [dual(2, "192.0.2.11", M2, "2001:db8::11")], {IPv6Address("2001:db8::11")}, V4_2,
     [["10.244.2.0/24", "BackendV6Data null"]]),
]  # fmt: skip


@pytest.mark.parametrize(
    "peers, direct, want, fragments", [c[1:] for c in DUAL_CASES], ids=[c[0] for c in DUAL_CASES]
)
def test_plan_dual_stack(peers, direct, want, fragments) -> None:
    got, warnings = plan(LOCAL6, {p.subnet: p for p in peers}, VX, direct, EXT, VX6)
    assert got == want
    assert len(warnings) == len(fragments), warnings
    for warning, parts in zip(warnings, fragments, strict=True):
        for part in parts:
            assert part in warning


def test_plan_without_the_ipv6_device_ignores_ipv6_data() -> None:
    """A v4-only config (no IPv6 device) or a lease without an IPv6 subnet: IPv4 only, and
    no word about IPv6 (peers without it are the norm there)."""
    bare = dual(3, "198.18.0.13", M3, None, subnet6=None)
    for local, vx6 in ((LOCAL6, 0), (dual(1, "192.0.2.10", M1, None, subnet6=None), VX6)):
        got, warnings = plan(local, {Q2.subnet: Q2, bare.subnet: bare}, VX, None, EXT, vx6)
        assert got == V4_2 | V4_3 and warnings == []


def test_reference_dual_stack_record_is_programmed() -> None:
    raw = (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":"2001:db8:64::3","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"7a:1b:9c:d1:00:2e"}}'
    )
    ref = Lease(IPv4Network("10.5.52.0/24"), LeaseAttrs.decode(raw), ipv6_subnet=net6(52))
    got, warnings = plan(LOCAL6, {ref.subnet: ref}, VX, None, EXT, VX6)
    assert not warnings
    assert got == entries("10.5.52.0/24", "192.168.64.3", "c6:d2:32:6f:8f:44") | entries6(
        52, "2001:db8:64::3", "7a:1b:9c:d1:00:2e"
    )


def test_dual_stack_peer_entries_are_applied_in_rank_order_and_removed_in_reverse() -> None:
    got, _ = plan(LOCAL6, {Q2.subnet: Q2}, VX, None, EXT, VX6)
    d = diff(got, set())
    assert [(e.kind, e.dst.version) for e in d.ordered_upserts()] == [
        ("arp", 4), ("arp", 6), ("fdb", 4), ("fdb", 6), ("route", 4), ("route", 6)
    ]  # fmt: skip
    assert [e.kind for e in diff(set(), got).ordered_removes()] == ["route"] * 2 + ["fdb"] * 2 + [
        "arp"
    ] * 2


def test_ipv6_mac_change_removes_the_old_fdb_entry_only_on_the_ipv6_device() -> None:
    before, _ = plan(LOCAL6, {Q2.subnet: Q2}, VX, None, EXT, VX6)
    moved = dual(2, "192.0.2.11", M2, "2001:db8::11", "0a:00:00:00:06:22")
    after, _ = plan(LOCAL6, {moved.subnet: moved}, VX, None, EXT, VX6)
    d = diff(after, before)
    assert d.remove == {Fdb(VX6, M6_2, IPv6Address("2001:db8::11"))}
    assert d.upsert == {
        Neigh(VX6, IPv6Address("fd00:10:244:2::"), "0a:00:00:00:06:22"),
        Fdb(VX6, "0a:00:00:00:06:22", IPv6Address("2001:db8::11")),
    }


def test_ipv6_vtep_mac_is_stable_and_distinct() -> None:
    ip6 = IPv6Address("2001:db8::10")
    mac6 = vtep_mac(ip6, 1)
    assert mac6 == vtep_mac(ip6, 1) and mac6 != vtep_mac(ip6, 2)
    assert mac6 != vtep_mac(IPv6Address("2001:db8::11"), 1)
    assert mac6 != vtep_mac(IPv4Address("192.0.2.10"), 1)
    first = int(mac6[:2], 16)
    assert first & 0x01 == 0 and first & 0x02 == 0x02
    # the IPv4 derivation is unchanged: a node keeps its MAC across the upgrade
    assert vtep_mac(IPv4Address("192.0.2.11"), 1) == _v4_mac_as_released("192.0.2.11", 1)


def _v4_mac_as_released(ip: str, vni: int) -> str:
    digest = hashlib.sha256(f"flannel-vtep/{ip}/{vni}".encode()).digest()
    return ":".join(f"{b:02x}" for b in [(digest[0] & 0xFC) | 0x02, *digest[1:6]])


def test_peer_mac6_reads_backend_v6_data_only() -> None:
    assert peer_mac6(Q2) == M6_2
    assert peer_mac6(lease("10.244.2.0/24", "192.0.2.11", {"VtepMAC": M2})) is None


def backend6(mtu: int = 1500, ip6: str | None = "2001:db8::10", **options: object) -> VxlanBackend:
    addr6 = IPv6Address(ip6) if ip6 else None
    ext = ExternalInterface(
        "eth0", EXT, IPv4Address("192.0.2.10"), IPv4Address("192.0.2.10"), mtu,
        iface_addr6=addr6, ext_addr6=addr6,
    )  # fmt: skip
    doc = {
        "Network": "10.244.0.0/16",
        "EnableIPv6": True,
        "IPv6Network": "fd00:10:244::/56",
        "Backend": {"Type": "vxlan", **options},
    }
    config = parse_config(json.dumps(doc))
    return VxlanBackend(
        BackendContext(ext, config, Path("/nonexistent"), config.backend), netns=NO_NETNS
    )


def test_dual_stack_mtu_fits_both_devices() -> None:
    assert backend6().mtu == 1430  # IPv6 outer header: 70 bytes
    assert backend6(mtu=9000).mtu == 8930


async def test_dual_stack_prepare_refuses_what_the_ipv6_device_cannot_be() -> None:
    """Each refused before the kernel is touched (these backends have no namespace to reach)."""
    with pytest.raises(ConfigError, match="flannel-v6.10000 longer than the kernel's 15"):
        await backend6(VNI=10_000).prepare()
    with pytest.raises(BackendError, match="at least 1350"):
        await backend6(mtu=1349).prepare()
    with pytest.raises(BackendError, match="eth0 has no global IPv6 address"):
        await backend6(ip6=None).prepare()


def test_config_validation_refuses_a_vni_too_long_for_the_ipv6_device() -> None:
    """`flannelctl config validate|set` (backends.checked_config) sees what only the agent's
    start did before: VNI 10000 is fine alone, not with EnableIPv6."""
    from backends.registry import checked_config

    base = {"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan", "VNI": 10_000}}
    assert checked_config(json.dumps(base)).backend_type == "vxlan"
    dual = {**base, "EnableIPv6": True, "IPv6Network": "fd00::/48"}
    with pytest.raises(ConfigError, match="flannel-v6.10000 longer than the kernel's 15"):
        checked_config(json.dumps(dual))
    checked_config(json.dumps({**dual, "Backend": {"Type": "vxlan", "VNI": 9_999}}))
