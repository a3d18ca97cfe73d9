"""vxlan without a kernel: options, the stable VTEP MAC, the pure plan (peer leases to ARP,
FDB and route entries, DirectRouting, skipped peers) and the diff it feeds."""

import json
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from backends import get_backend
from backends.base import BackendContext, BackendError
from backends.reconcile import Fdb, Neigh, Route, diff
from backends.vxlan import VxlanBackend, VxlanOptions, mismatches, parse_options, plan, vtep_mac
from flanneld.core.config import ConfigError, parse_config
from flanneld.core.interfaces import ExternalInterface
from flanneld.core.lease import Lease, LeaseAttrs

VX, EXT = 5, 2
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
    return VxlanBackend(BackendContext(ext, config, Path("/nonexistent"), config.backend))


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
