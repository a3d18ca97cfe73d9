"""The plan kept from pass to pass (backends/plancache.py) equals the whole plan made afresh,
after any sequence of peers added, changed (MACs taken from each other, made invalid, moved
on-link) and removed, for vxlan (dual-stack, DirectRouting) and host-gw; and the slots it says
changed are exactly those whose planned entry changed."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import given, settings
from hypothesis import strategies as st

from backends import hostgw, vxlanplan
from backends.plancache import PlanCache, Planner
from flanneld.core.lease import Lease, LeaseAttrs

VX, VX6, EXT = 5, 6, 2
OUR_MAC, OUR_MAC6 = "0a:00:00:00:00:aa", "0a:00:00:00:06:aa"
LOCAL = Lease(
    IPv4Network("10.244.0.0/24"),
    LeaseAttrs(
        IPv4Address("192.0.2.1"),
        "vxlan",
        {"VNI": 1, "VtepMAC": OUR_MAC},
        IPv6Address("2001:db8::1"),
        {"VNI": 1, "VtepMAC": OUR_MAC6},
    ),
    ipv6_subnet=IPv6Network("fd00:0:0:0::/64"),
)
# few subnets, MACs and addresses, so that peers often collide, share a MAC or take ours
MACS = [
    OUR_MAC,
    "0a:00:00:00:00:01",
    "0a:00:00:00:00:02",
    "0a:00:00:00:00:03",
    "ff:ff:00:00:00:01",
    "bad",
]

peer = st.builds(
    lambda n, ip, mac, mac6, created, kind, six: Lease(
        IPv4Network(f"10.244.{n}.0/24"),
        LeaseAttrs(
            IPv4Address(f"192.0.2.{ip}"),
            kind,
            {"VNI": 1, "VtepMAC": mac},
            IPv6Address(f"2001:db8::{ip}") if six else None,
            {"VNI": 1, "VtepMAC": mac6} if six else None,
        ),
        create_revision=created,
        ipv6_subnet=IPv6Network(f"fd00:0:0:{n}::/64") if six else None,
    ),
    st.integers(0, 7),
    st.integers(1, 6),
    st.sampled_from(MACS),
    st.sampled_from([*MACS, OUR_MAC6]),
    st.integers(1, 5),
    st.sampled_from(["vxlan", "vxlan", "vxlan", "host-gw"]),
    st.booleans(),
)
step = st.one_of(
    st.tuples(st.just("put"), peer),
    st.tuples(st.just("del"), st.integers(0, 7)),
    st.tuples(st.just("direct"), st.frozensets(st.integers(1, 6), max_size=3)),
)


def vxlan_planner(direct: frozenset[int]) -> Planner:
    on_link = {IPv4Address(f"192.0.2.{i}") for i in direct}
    on_link |= {IPv6Address(f"2001:db8::{i}") for i in direct}
    return Planner(
        (LOCAL, VX, VX6, EXT, True),
        lambda some: vxlanplan.plan(LOCAL, some, VX, on_link or None, EXT, VX6),
        vxlanplan.claims,
        lambda p: (p.attrs.public_ip in on_link, p.attrs.public_ipv6 in on_link),
    )


def hostgw_planner(_: frozenset[int]) -> Planner:
    return Planner((LOCAL, EXT), lambda some: hostgw.plan(LOCAL, some, EXT))


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=25), st.sampled_from([vxlan_planner, hostgw_planner]))
def test_the_cached_plan_is_the_whole_plan(steps, make) -> None:
    cache, peers, direct = PlanCache(), {}, frozenset()
    for op, arg in steps:
        if op == "put":
            peers[arg.subnet] = arg
        elif op == "del":
            peers.pop(IPv4Network(f"10.244.{arg}.0/24"), None)
        else:
            direct = arg
        planner = make(direct)
        before = dict(cache.desired)
        update = cache.update(planner, peers)
        want, warnings = planner.plan(peers)
        assert set(cache.desired.values()) == want
        assert all(slot == e.slot for slot, e in cache.desired.items())
        assert sorted(cache.warnings()) == sorted(warnings)
        differ = {
            s for s in before.keys() | cache.desired.keys() if before.get(s) != cache.desired.get(s)
        }
        assert differ <= update.slots
        assert all(update.before.get(s) == before.get(s) for s in update.slots)


def test_an_unchanged_peer_is_not_planned_again() -> None:
    calls = []

    def counting(some):
        calls.append(set(some))
        return hostgw.plan(LOCAL, some, EXT)

    a = Lease(IPv4Network("10.244.1.0/24"), LeaseAttrs(IPv4Address("192.0.2.2"), "host-gw"))
    b = Lease(IPv4Network("10.244.2.0/24"), LeaseAttrs(IPv4Address("192.0.2.3"), "host-gw"))
    cache, planner = PlanCache(), Planner((LOCAL, EXT), counting)
    cache.update(planner, {a.subnet: a})
    calls.clear()
    update = cache.update(planner, {a.subnet: a, b.subnet: b})
    assert calls == [{b.subnet}]
    assert update.slots == {e.slot for e in cache.desired.values() if e.dst == b.subnet}
    calls.clear()
    assert not cache.update(planner, {a.subnet: a, b.subnet: b}).slots and calls == []
