"""The generic diff of desired against actual kernel entries, and the order it applies them."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from backends.reconcile import Diff, Fdb, KernelView, Neigh, Route, diff, missing_by_peer

A = IPv4Network("10.244.2.0/24")
B = IPv4Network("10.244.3.0/24")
GW1 = IPv4Address("192.0.2.11")
GW2 = IPv4Address("192.0.2.12")


def r(dst: IPv4Network, gw: IPv4Address = GW1, oif: int = 3, onlink: bool = False) -> Route:
    return Route(dst, gw, oif, onlink)


CASES = [
    # name, desired, actual, upsert, remove
    ("empty", set(), set(), set(), set()),
    ("in sync", {r(A), r(B)}, {r(A), r(B)}, set(), set()),
    ("add", {r(A), r(B)}, {r(A)}, {r(B)}, set()),
    ("remove", {r(A)}, {r(A), r(B)}, set(), {r(B)}),
    ("gateway change is an upsert", {r(A, GW2)}, {r(A, GW1)}, {r(A, GW2)}, set()),
    ("oif change is an upsert", {r(A, oif=4)}, {r(A, oif=3)}, {r(A, oif=4)}, set()),
    ("onlink change is an upsert", {r(A, onlink=True)}, {r(A)}, {r(A, onlink=True)}, set()),
    ("dumped without gateway", {r(A)}, {Route(A, None, 3)}, {r(A)}, set()),
    ("all gone", set(), {r(A), r(B)}, set(), {r(A), r(B)}),
]


@pytest.mark.parametrize(
    "desired, actual, upsert, remove", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_diff(desired, actual, upsert, remove) -> None:
    d = diff(desired, actual)
    assert set(d.upsert) == upsert
    assert set(d.remove) == remove
    assert bool(d) == bool(upsert or remove)


MAC1 = "0a:00:00:00:00:01"
MAC2 = "0a:00:00:00:00:02"
PEER = IPv4Address("10.244.2.0")


def test_keys_are_per_kind() -> None:
    # An ARP entry and an FDB entry on one device never collide, even with equal fields.
    desired = {Neigh(5, PEER, MAC1), Fdb(5, MAC1, GW1)}
    assert not diff(desired, desired)
    assert diff(desired, set()).upsert == frozenset(desired)


def test_neigh_keyed_by_device_and_ip() -> None:
    d = diff({Neigh(5, PEER, MAC2)}, {Neigh(5, PEER, MAC1)})
    assert d.upsert == {Neigh(5, PEER, MAC2)} and not d.remove


def test_fdb_keyed_by_device_and_mac() -> None:
    # A new VtepMAC is a new FDB entry, and the old MAC's entry is stale.
    d = diff({Fdb(5, MAC2, GW1)}, {Fdb(5, MAC1, GW1)})
    assert d.upsert == {Fdb(5, MAC2, GW1)}
    assert d.remove == {Fdb(5, MAC1, GW1)}
    # A new PublicIP for the same MAC replaces the destination.
    d = diff({Fdb(5, MAC1, GW2)}, {Fdb(5, MAC1, GW1)})
    assert d.upsert == {Fdb(5, MAC1, GW2)} and not d.remove


def test_mac_case_does_not_matter() -> None:
    assert Neigh(5, PEER, "0A:00:00:00:00:01") == Neigh(5, PEER, MAC1)
    assert not diff({Fdb(5, "0A:00:00:00:00:01", GW1)}, {Fdb(5, MAC1, GW1)})


def test_upserts_run_arp_fdb_then_route() -> None:
    peer_c = IPv4Address("10.244.3.0")
    entries = [
        r(B, peer_c, 5, True),
        r(A, PEER, 5, True),
        Fdb(5, MAC2, GW2),
        Neigh(5, peer_c, MAC2),
        Fdb(5, MAC1, GW1),
        Neigh(5, PEER, MAC1),
    ]
    order = diff(entries, set()).ordered_upserts()
    assert [e.kind for e in order] == ["arp", "arp", "fdb", "fdb", "route", "route"]
    assert order[-2:] == [r(A, PEER, 5, True), r(B, peer_c, 5, True)]  # by key within a kind


def test_removes_run_route_fdb_then_arp() -> None:
    entries = {r(A, PEER, 5, True), Fdb(5, MAC1, GW1), Neigh(5, PEER, MAC1)}
    order = diff(set(), entries).ordered_removes()
    assert [e.kind for e in order] == ["route", "fdb", "arp"]


def test_empty_diff_is_falsy() -> None:
    assert not Diff(frozenset(), frozenset())
    assert Diff(frozenset(), frozenset()).ordered_upserts() == []


def test_kernel_view_follows_what_was_applied():
    view = KernelView()
    assert not view.known and view.entries() == set()
    a = Route(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.2"), 2)
    b = Route(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.3"), 2)
    b2 = Route(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.9"), 2)
    view.applied([a], [])  # nothing known yet: ignored, the next pass must dump
    assert not view.known
    view.refresh([a, b])
    view.applied([b2], [a])
    assert view.known and view.entries() == {b2}
    view.invalidate()
    assert not view.known


def test_missing_by_peer_groups_entries_by_the_peer_they_serve():
    from flanneld.core.lease import Lease, LeaseAttrs

    s2, s3 = IPv4Network("10.244.2.0/24"), IPv4Network("10.244.3.0/24")
    ip2, ip3 = IPv4Address("192.0.2.2"), IPv4Address("192.0.2.3")
    peers = {s2: Lease(s2, LeaseAttrs(ip2, "vxlan")), s3: Lease(s3, LeaseAttrs(ip3, "vxlan"))}
    r2 = Route(s2, IPv4Address("10.244.2.0"), 5, onlink=True)
    n2 = Neigh(5, IPv4Address("10.244.2.0"), "0a:00:00:00:00:02")
    f2 = Fdb(5, "0a:00:00:00:00:02", ip2)
    r3 = Route(s3, IPv4Address("10.244.3.0"), 5, onlink=True)
    f3 = Fdb(5, "0a:00:00:00:00:03", ip3)
    stray = Route(IPv4Network("10.9.0.0/24"), ip2, 5)
    missing = missing_by_peer({r2, n2, f2, r3, f3, stray}, {r3, f3, n2}, peers)
    assert missing == {s2: [f2, r2], s3: []}


def test_an_ipv4_and_an_ipv6_entry_with_equal_address_ints_never_share_a_slot() -> None:
    # slots key addresses by their ints: 0.0.0.0/32 and ::/32 are both 0 there
    v4 = Route(IPv4Network("0.0.0.0/32"), IPv4Address("0.0.0.1"), 3, onlink=True)
    v6 = Route(IPv6Network("::/32"), IPv6Address("::1"), 3, onlink=True)
    assert v4.slot != v6.slot and v4 != v6
    assert Neigh(3, IPv4Address("0.0.0.1"), "aa:00:00:00:00:01").slot != (
        Neigh(3, IPv6Address("::1"), "aa:00:00:00:00:01").slot
    )
    assert Fdb(3, "aa:00:00:00:00:01", IPv4Address("0.0.0.1")) != Fdb(
        3, "aa:00:00:00:00:01", IPv6Address("::1")
    )
