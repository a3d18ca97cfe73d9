"""Dual-stack without a kernel (issue 15): the IPv6 key codec, records as the reference writes
them, the IPv6 rules and claims in the peer table, subnet choice, subnet.env, the interface's
IPv6 address and the host-gw plan."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.hostgw import plan
from backends.reconcile import Route
from flanneld.core.admission import PeerRules
from flanneld.core.allocation import choose_subnet
from flanneld.core.config import parse_config
from flanneld.core.interfaces import InterfaceError, Link, select
from flanneld.core.lease import Lease, LeaseAttrs, RecordError
from flanneld.core.peers import PeerTable, Snapshot, WatchEvent
from flanneld.core.subnets import parse_key, subnet_key
from flanneld.edges import subnetenv

CFG = parse_config(
    json.dumps(
        {
            "Network": "10.244.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": "fd00:10:244::/56",
            "Backend": {"Type": "host-gw"},
        }
    )
)
V4ONLY = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')


def lease(v4: str, v6: str | None, ip: str = "192.0.2.11", ip6: str | None = "fd00:192::11",
          created: int = 0, backend: str = "host-gw") -> Lease:  # fmt: skip
    attrs = LeaseAttrs(IPv4Address(ip), backend, public_ipv6=IPv6Address(ip6) if ip6 else None)
    net6 = IPv6Network(v6) if v6 else None
    return Lease(IPv4Network(v4), attrs, 7, create_revision=created, ipv6_subnet=net6)


# -- keys and records ------------------------------------------------------------------------
@given(
    st.integers(0, 2**32 - 1),
    st.integers(8, 30),
    st.integers(0, 2**128 - 1),
    st.integers(16, 126),
)
def test_dual_stack_keys_round_trip(a4, l4, a6, l6):
    net = IPv4Network((a4, l4), strict=False)
    net6 = IPv6Network((a6, l6), strict=False)
    key = subnet_key(net, net6)
    assert parse_key(key) == (net, net6)
    assert key.count("&") == 1 and key == key.lower()


@pytest.mark.parametrize(
    "key",
    [
        "10.5.52.0-24&fc00::5:0:0:0:0-64",  # not compressed as Go prints it
        "10.5.52.0-24&FC00:0:0:5::-64",  # upper case
        "10.5.52.0-24&fc00:0:0:5::1-64",  # host bits
        "10.5.52.0-24&fc00:0:0:5::-064",
        "10.5.52.0-24&10.1.0.0-24",
        "10.5.52.0-24&",
    ],
)
def test_non_canonical_dual_stack_keys_name_nothing(key):
    assert parse_key(key) is None


def test_reference_dual_stack_record_round_trips_byte_for_byte():
    raw = (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":"fc00::3","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"ca:1e:6e:9d:2f:11"}}'
    )
    attrs = LeaseAttrs.decode(raw)
    assert attrs.public_ipv6 == IPv6Address("fc00::3")
    assert attrs.encode() == raw


@pytest.mark.parametrize("v6", ['"not-an-address"', '"10.0.0.1"', "7"])
def test_bad_public_ipv6_is_a_malformed_record(v6):
    with pytest.raises(RecordError, match="PublicIPv6"):
        LeaseAttrs.decode(b'{"PublicIP":"192.0.2.1","PublicIPv6":' + v6.encode() + b"}")


# -- the IPv6 rules --------------------------------------------------------------------------
RULES = PeerRules(CFG, IPv4Address("192.0.2.10"), IPv6Address("fd00:192::10"))


@pytest.mark.parametrize(
    "record, rule",
    [
        (lease("10.244.2.0/24", "fd00:99::/64"), "outside_network"),
        (lease("10.244.2.0/24", "fd00:10:244::/56"), "subnet_len"),
        (lease("10.244.2.0/24", "fd00:10:244:2::/64", ip6=None), "public_ip"),
        (lease("10.244.2.0/24", "fd00:10:244:2::/64", ip6="::1"), "public_ip"),
        (lease("10.244.2.0/24", "fd00:10:244:2::/64", ip6="ff02::1"), "public_ip"),
        (lease("10.244.2.0/24", "fd00:10:244:2::/64", ip6="fe80::1"), "public_ip"),
        (lease("10.244.2.0/24", "fd00:10:244:2::/64", ip6="fd00:10:244:9::1"), "public_ip"),
        (lease("10.244.2.0/24", "fd00:10:244:2::/64", ip6="::ffff:192.0.2.1"), "public_ip"),
    ],
)
def test_ipv6_half_of_a_record_breaks_rules(record, rule):
    with pytest.raises(RecordError) as e:
        RULES.check(record)
    assert e.value.rule == rule


def test_ipv6_part_in_a_network_without_ipv6_breaks_the_key_rule():
    with pytest.raises(RecordError) as e:
        PeerRules(V4ONLY).check(lease("10.244.2.0/24", "fd00:10:244:2::/64"))
    assert e.value.rule == "key"


def test_a_v4_only_record_in_a_dual_stack_network_is_a_v4_peer():
    RULES.check(lease("10.244.2.0/24", None, ip6=None))


# -- claims: the older record keeps the space --------------------------------------------------
def test_two_keys_for_one_ipv4_subnet_the_older_wins_and_the_alias_cannot_delete_it():
    t = PeerTable(RULES.check)
    old = lease("10.244.2.0/24", "fd00:10:244:2::/64", created=5)
    alias = lease("10.244.2.0/24", "fd00:10:244:7::/64", ip="192.0.2.66", created=9)
    t.reset(Snapshot({old.key: old, alias.key: alias}, {}, 10))
    assert t.leases[old.subnet] == old and t.rejected[alias.key].rule == "overlap"
    assert t.apply(WatchEvent(alias.key, alias.subnet, None, revision=11)) == []
    assert t.leases[old.subnet] == old
    # a later put under the alias key is refused the same way
    assert t.apply(WatchEvent(alias.key, alias.subnet, alias, revision=12)) == []
    assert t.leases[old.subnet] == old


def test_two_records_claiming_one_ipv6_subnet_the_older_wins():
    t = PeerTable(RULES.check)
    a = lease("10.244.2.0/24", "fd00:10:244:2::/64", created=5)
    b = lease("10.244.3.0/24", "fd00:10:244:2::/64", ip="192.0.2.12", created=8)
    t.reset(Snapshot({b.key: b, a.key: a}, {}, 10))
    assert set(t.leases) == {a.subnet} and t.rejected[b.key].rule == "overlap"
    c = lease("10.244.4.0/24", "fd00:10:244:2::/64", ip="192.0.2.13", created=11)
    assert t.apply(WatchEvent(c.key, c.subnet, c, revision=11)) == []
    assert c.subnet not in t.leases and t.rejected[c.key].rule == "overlap"


# -- subnet choice -----------------------------------------------------------------------------
ME = IPv4Address("192.0.2.10")


def test_dual_stack_choice_gives_both_halves_free_and_in_range():
    taken = lease("10.244.2.0/24", "fd00:10:244:1::/64")
    for seed in range(20):
        c = choose_subnet(CFG, [taken], ME, rng=random.Random(seed))
        assert CFG.contains_lease(c.subnet) and c.subnet != taken.subnet
        assert c.subnet6 is not None and CFG.ipv6.contains(c.subnet6)
        assert c.subnet6 != taken.ipv6_subnet


def test_previous_ipv6_subnet_is_reused_when_free_and_not_when_taken():
    prev6 = IPv6Network("fd00:10:244:42::/64")
    c = choose_subnet(CFG, [], ME, IPv4Network("10.244.42.0/24"), previous6=prev6)
    assert c.subnet6 == prev6 and c.subnet == IPv4Network("10.244.42.0/24")
    other = lease("10.244.9.0/24", "fd00:10:244:42::/64")
    assert choose_subnet(CFG, [other], ME, previous6=prev6).subnet6 != prev6


def test_own_lease_without_ipv6_is_stale_once_ipv6_is_enabled():
    mine = lease("10.244.5.0/24", None, ip=str(ME), ip6=None)
    c = choose_subnet(CFG, [mine], ME, IPv4Network("10.244.5.0/24"))
    assert c.existing is None and c.stale == (mine,)
    assert c.subnet == IPv4Network("10.244.5.0/24") and c.subnet6 is not None
    mine6 = lease("10.244.5.0/24", "fd00:10:244:5::/64", ip=str(ME))
    assert choose_subnet(CFG, [mine6], ME).existing == mine6
    assert choose_subnet(V4ONLY, [mine6], ME).stale == (mine6,)  # and back


# -- subnet.env --------------------------------------------------------------------------------
def test_subnet_env_dual_stack_lines_in_the_reference_order(tmp_path):
    text = subnetenv.render(
        IPv4Network("10.5.0.0/16"),
        IPv4Network("10.5.52.0/24"),
        1450,
        False,
        IPv6Network("fc00::/48"),
        IPv6Network("fc00:0:0:5::/64"),
    )
    assert text == (
        "FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.52.1/24\n"
        "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00:0:0:5::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
    )
    path = tmp_path / "subnet.env"
    path.write_text(text)
    assert subnetenv.previous_subnet(path) == IPv4Network("10.5.52.0/24")
    assert subnetenv.previous_subnet(path, "FLANNEL_IPV6_SUBNET", 6) == IPv6Network(
        "fc00:0:0:5::/64"
    )
    path.write_text("FLANNEL_IPV6_SUBNET=10.5.52.1/24\n")  # a v4 value where v6 belongs
    assert subnetenv.previous_subnet(path, "FLANNEL_IPV6_SUBNET", 6) is None


# -- the interface's IPv6 address -------------------------------------------------------------
LINK = Link(
    "eth0",
    2,
    1500,
    (IPv4Address("192.0.2.10"),),
    (IPv4Network("192.0.2.0/24"),),
    (IPv6Address("fd00:192::10"),),
    (IPv6Network("fd00:192::/64"),),
)


def test_select_finds_the_global_ipv6_address_and_takes_public_ipv6():
    e = select([LINK], ["eth0"], [], None)
    assert e.iface_addr6 == e.ext_addr6 == IPv6Address("fd00:192::10")
    assert e.underlay6 == IPv6Network("fd00:192::/64")
    e = select([LINK], ["eth0"], [], None, public_ipv6="2001:db8::7")
    assert e.ext_addr6 == IPv6Address("2001:db8::7") and e.iface_addr6 == IPv6Address(
        "fd00:192::10"
    )
    with pytest.raises(InterfaceError, match="--public-ipv6"):
        select([LINK], ["eth0"], [], None, public_ipv6="10.0.0.1")


# -- host-gw ------------------------------------------------------------------------------------
def test_host_gw_plans_ipv6_routes_for_every_dual_stack_peer():
    local = lease("10.244.1.0/24", "fd00:10:244:1::/64", ip="192.0.2.10", ip6="fd00:192::10")
    p2 = lease("10.244.2.0/24", "fd00:10:244:2::/64", ip="192.0.2.11", ip6="fd00:192::11")
    p3 = lease("10.244.3.0/24", None, ip="192.0.2.12", ip6=None)  # a v4-only peer
    routes, warnings = plan(local, {p2.subnet: p2, p3.subnet: p3}, 2)
    assert not warnings
    assert routes == {
        Route(p2.subnet, IPv4Address("192.0.2.11"), 2),
        Route(p2.ipv6_subnet, IPv6Address("fd00:192::11"), 2),
        Route(p3.subnet, IPv4Address("192.0.2.12"), 2),
    }
    v4_local = lease("10.244.1.0/24", None, ip="192.0.2.10", ip6=None)
    routes, _ = plan(v4_local, {p2.subnet: p2}, 2)
    assert routes == {Route(p2.subnet, IPv4Address("192.0.2.11"), 2)}
