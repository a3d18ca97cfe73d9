"""`flannelctl reserve`'s plan: what key and record a reservation gets in each kind of network,
and every refusal (pure, no etcd)."""

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from flanneld.core.config import parse_config
from flanneld.core.lease import Lease, LeaseAttrs
from flanneld.core.reservation import ReservationError, in_the_way, plan_reservation

HOSTGW = {"Backend": {"Type": "host-gw"}}
SIX = {"EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
V4 = parse_config(json.dumps({"Network": "10.244.0.0/16", **HOSTGW}))
DUAL = parse_config(json.dumps({"Network": "10.244.0.0/16", **SIX, **HOSTGW}))
V6 = parse_config(json.dumps({"EnableIPv4": False, **SIX, **HOSTGW}))


def test_ipv4_network_gets_the_reference_key_and_record() -> None:
    r = plan_reservation(V4, "10.244.7.0/24", "192.0.2.17", "host-gw")
    assert r.key == "10.244.7.0-24"
    assert r.attrs.encode() == (
        b'{"PublicIP":"192.0.2.17","PublicIPv6":null,"BackendType":"host-gw"}'
    )


def test_dual_stack_reservation_has_both_halves() -> None:
    r = plan_reservation(
        DUAL, "10.244.7.0/24", "192.0.2.17", "", "fd00:10:244:7::/64", "fd00:192::17"
    )
    assert r.key == "10.244.7.0-24&fd00:10:244:7::-64"
    assert r.attrs.public_ipv6 == IPv6Address("fd00:192::17")
    assert r.ident == r.subnet


def test_ipv6_only_reservation_is_keyed_as_the_reference_keys_such_leases() -> None:
    r = plan_reservation(V6, "fd00:10:244:7::/64", "fd00:192::17", "")
    assert r.key == "0.0.0.0-0&fd00:10:244:7::-64"
    assert r.attrs.public_ip == IPv4Address("0.0.0.0")
    assert r.attrs.node_ip == IPv6Address("fd00:192::17")
    assert r.ident == IPv6Network("fd00:10:244:7::/64")


def test_without_a_config_only_ipv4_can_be_reserved() -> None:
    assert plan_reservation(None, "10.9.7.0/24", "192.0.2.17", "").key == "10.9.7.0-24"
    with pytest.raises(ReservationError, match="no network config"):
        plan_reservation(None, "fd00::/64", "fd00::1", "")


@pytest.mark.parametrize(
    ("config", "args", "problem"),
    [
        (V4, ("10.244.7.0/25", "192.0.2.17"), "SubnetLen"),
        (V4, ("10.245.7.0/24", "192.0.2.17"), "SubnetMin"),
        (V4, ("10.244.7.1/24", "192.0.2.17"), "not an IPv4 subnet"),
        (V4, ("10.244.7.0/24", "fd00::1"), "not an IPv4 address"),
        (V4, ("10.244.7.0/24", "192.0.2.17", "fd00:10:244:7::/64", "fd00::1"), "no IPv6"),
        (DUAL, ("10.244.7.0/24", "192.0.2.17"), "--ipv6-subnet"),
        (DUAL, ("10.244.7.0/24", "192.0.2.17", "fd00:10:244:7::/64"), "--public-ipv6"),
        (DUAL, ("10.244.7.0/24", "192.0.2.17", "fd00:99::/64", "fd00::1"), "IPv6SubnetMin"),
        (DUAL, ("10.244.7.0/24", "192.0.2.17", "fd00:10:244:7::/64", "10.0.0.1"), "IPv6 add"),
        (DUAL, ("10.244.7.0/24", "192.0.2.17", "fd00:10:244:7::/64", "ff02::1"), "unicast"),
        (V6, ("10.244.7.0/24", "192.0.2.17"), "IPv6-only"),
        (V6, ("fd00:10:244:7::/64", "192.0.2.17"), "not an IPv6 address"),
        (V6, ("fd00:10:244:7::/64", "fd00::1", "fd00:10:244:8::/64", "fd00::1"), "IPv6-only"),
        (V6, ("fd00:10:244:7::/80", "fd00::1"), "IPv6SubnetLen"),
        (V4, ("10.244.7.0/24", "0.0.0.0"), "unicast"),
    ],
)
def test_refusals_name_the_problem(config, args, problem) -> None:
    subnet, ip, *v6 = args
    with pytest.raises(ReservationError, match=problem):
        plan_reservation(config, subnet, ip, "", *v6)


def test_a_lease_keyed_as_planned_is_what_the_agent_reads_back() -> None:
    r = plan_reservation(
        DUAL, "10.244.7.0/24", "192.0.2.17", "vxlan", "fd00:10:244:7::/64", "fd00:192::17"
    )
    lease = Lease(r.subnet, r.attrs, 0, 1, 1, r.subnet6)
    assert lease.key == r.key and lease.is_reservation and lease.ident == r.ident


def _lease(key4: str, ip: str, key6: str | None = None, etcd_lease: int = 7) -> Lease:
    v6 = IPv6Network(key6) if key6 else None
    return Lease(IPv4Network(key4), LeaseAttrs(IPv4Address(ip)), etcd_lease, 1, 1, v6)


def test_what_is_in_the_way_of_a_dual_stack_reservation() -> None:
    plan = plan_reservation(
        DUAL, "10.244.7.0/24", "192.0.2.17", "", "fd00:10:244:7::/64", "fd00:192::17"
    )
    own_same_key = Lease(plan.subnet, plan.attrs, 7, 1, 1, plan.subnet6)
    other_v6_half = _lease("10.244.7.0/24", "192.0.2.17", "fd00:10:244:9::/64")
    others_v6 = _lease("10.244.9.0/24", "192.0.2.19", "fd00:10:244:7::/64")
    others_same_key = Lease(
        plan.subnet, LeaseAttrs(IPv4Address("192.0.2.18")), 7, 1, 1, plan.subnet6
    )
    apart = _lease("10.244.8.0/24", "192.0.2.18", "fd00:10:244:8::/64")
    leases = [own_same_key, other_v6_half, others_v6, others_same_key, apart]
    assert in_the_way(plan, leases) == [other_v6_half, others_v6, others_same_key]


def test_ipv6_only_leases_are_in_the_way_by_their_ipv6_half_only() -> None:
    plan = plan_reservation(V6, "fd00:10:244:7::/64", "fd00:192::17", "")
    no_v4 = IPv4Network("0.0.0.0/0")
    other = Lease(
        no_v4,
        LeaseAttrs(IPv4Address(0), public_ipv6=IPv6Address("fd00::9")),
        7,
        1,
        1,
        IPv6Network("fd00:10:244:8::/64"),
    )
    same = Lease(
        no_v4,
        LeaseAttrs(IPv4Address(0), public_ipv6=IPv6Address("fd00::9")),
        7,
        1,
        1,
        IPv6Network("fd00:10:244:7::/64"),
    )
    assert in_the_way(plan, [other, same]) == [same]  # 0.0.0.0/0 overlaps nothing here
