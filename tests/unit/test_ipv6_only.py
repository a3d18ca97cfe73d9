"""IPv6-only networks (`EnableIPv4: false`, issue 15) without a kernel: keys `0.0.0.0-0&<v6>`
as the reference's MakeSubnetKey writes them, the record rules, the peer table keyed by the
IPv6 subnet, subnet choice by PublicIPv6, subnet.env, the interface without IPv4, and the
host-gw and vxlan plans with IPv6 entries alone."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends import hostgw, vxlanplan
from backends.reconcile import Fdb, Neigh, Route
from flanneld.core.admission import PeerRules
from flanneld.core.allocation import choose_subnet
from flanneld.core.config import NO_IPV4, parse_config
from flanneld.core.firewall import rules
from flanneld.core.interfaces import NO_ADDRESS, InterfaceError, Link, select
from flanneld.core.lease import Lease, LeaseAttrs, RecordError
from flanneld.core.peers import PeerTable, Snapshot, WatchEvent
from flanneld.core.subnets import ident_of, parse_key, subnet_key
from flanneld.edges import subnetenv

V6ONLY = parse_config(
    json.dumps(
        {
            "EnableIPv4": False,
            "EnableIPv6": True,
            "IPv6Network": "fd00:10:244::/56",
            "Backend": {"Type": "vxlan"},
        }
    )
)
DUAL = parse_config(
    json.dumps(
        {
            "Network": "10.244.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": "fd00:10:244::/56",
            "Backend": {"Type": "vxlan"},
        }
    )
)
MAC6 = "0e:00:00:00:00:{:02x}"


def lease6(
    v6: str, ip6: str | None = "fd00:192::11", created: int = 0, n: int = 1, backend: str = "vxlan"
) -> Lease:
    """An IPv6-only lease as the agent writes it: PublicIP 0.0.0.0, BackendV6Data only."""
    attrs = LeaseAttrs(
        NO_ADDRESS,
        backend,
        public_ipv6=IPv6Address(ip6) if ip6 else None,
        backend_v6_data={"VNI": 1, "VtepMAC": MAC6.format(n)} if backend == "vxlan" else None,
    )
    return Lease(NO_IPV4, attrs, 7, create_revision=created, ipv6_subnet=IPv6Network(v6))


# -- keys and records ------------------------------------------------------------------------
@given(st.integers(0, 2**128 - 1), st.integers(16, 126))
def test_ipv6_only_keys_round_trip_and_name_the_ipv6_subnet(a6, l6):
    net6 = IPv6Network((a6, l6), strict=False)
    key = subnet_key(NO_IPV4, net6)
    assert key.startswith("0.0.0.0-0&")
    assert parse_key(key) == (NO_IPV4, net6)
    assert ident_of(NO_IPV4, net6) == net6
    assert ident_of(IPv4Network("10.244.3.0/24"), net6) == IPv4Network("10.244.3.0/24")


def test_ipv6_only_record_encodes_as_the_reference_and_names_the_node_by_ipv6():
    lease = lease6("fd00:10:244:3::/64")
    assert lease.key == "0.0.0.0-0&fd00:10:244:3::-64"
    assert lease.ident == IPv6Network("fd00:10:244:3::/64") and not lease.has_ipv4
    raw = lease.attrs.encode()
    doc = json.loads(raw)
    assert doc["PublicIP"] == "0.0.0.0" and "BackendData" not in doc
    assert LeaseAttrs.decode(raw) == lease.attrs
    assert lease.attrs.node_ip == IPv6Address("fd00:192::11")
    dual = LeaseAttrs(IPv4Address("192.0.2.1"), public_ipv6=IPv6Address("fd00:192::1"))
    assert dual.node_ip == IPv4Address("192.0.2.1")


@pytest.mark.parametrize(
    "lease, rule",
    [
        # a dual-stack or IPv4 record in an IPv6-only network
        (Lease(IPv4Network("10.244.3.0/24"), LeaseAttrs(IPv4Address("192.0.2.1")), 1), "key"),
        (Lease(IPv4Network("10.244.3.0/24"), LeaseAttrs(IPv4Address("192.0.2.1"),
               public_ipv6=IPv6Address("fd00:192::1")), 1,
               ipv6_subnet=IPv6Network("fd00:10:244:3::/64")), "key"),
        (Lease(NO_IPV4, LeaseAttrs(NO_ADDRESS), 1), "key"),  # no IPv6 part at all
        (lease6("fd00:10:245::/64"), "outside_network"),
        (lease6("fd00:10:244:3::/80"), "subnet_len"),
        (lease6("fd00:10:244:3::/64", ip6=None), "public_ip"),
        (lease6("fd00:10:244:3::/64", ip6="::1"), "public_ip"),
        (lease6("fd00:10:244:3::/64", ip6="fd00:10:244:9::1"), "public_ip"),
    ],
)  # fmt: skip
def test_ipv6_only_network_checks_the_ipv6_half_and_refuses_ipv4_parts(lease, rule):
    with pytest.raises(RecordError) as exc:
        PeerRules(V6ONLY).check(lease)
    assert exc.value.rule == rule


def test_ipv6_only_record_is_fine_in_its_network_and_refused_in_a_dual_stack_one():
    good = lease6("fd00:10:244:3::/64")
    PeerRules(V6ONLY).check(good)
    with pytest.raises(RecordError) as exc:
        PeerRules(DUAL).check(good)  # 0.0.0.0/0 would be a default route
    assert exc.value.rule == "outside_network"


# -- the peer table --------------------------------------------------------------------------
def test_peer_table_keeps_ipv6_only_leases_apart_by_their_ipv6_subnet():
    t = PeerTable(PeerRules(V6ONLY).check, quiet=True)
    a, b = lease6("fd00:10:244:1::/64", "fd00:192::1", 1, 1), lease6(
        "fd00:10:244:2::/64", "fd00:192::2", 2, 2
    )
    changes = t.reset(Snapshot({a.key: a, b.key: b}, {}, 5))
    assert {c.subnet for c in changes} == {a.ident, b.ident}
    assert set(t.leases) == {a.ident, b.ident}
    c = lease6("fd00:10:244:3::/64", "fd00:192::3", 6, 3)
    assert [ch.kind for ch in t.apply(WatchEvent(c.key, c.ident, c, revision=6))] == ["added"]
    assert [ch.kind for ch in t.apply(WatchEvent(a.key, a.ident, None, revision=7))] == ["removed"]
    assert set(t.leases) == {b.ident, c.ident}


# -- choosing a subnet -----------------------------------------------------------------------
def test_ipv6_only_choice_has_no_ipv4_part_and_reuses_our_lease_by_public_ipv6():
    rng = random.Random(1)
    other = lease6("fd00:10:244:1::/64", "fd00:192::1", 1, 1)
    choice = choose_subnet(V6ONLY, [other], IPv6Address("fd00:192::9"), rng=rng)
    assert choice.subnet == NO_IPV4 and choice.existing is None
    assert choice.subnet6 is not None and V6ONLY.ipv6.contains(choice.subnet6)
    assert choice.subnet6 != other.ipv6_subnet
    mine = lease6("fd00:10:244:7::/64", "fd00:192::9", 2, 9)
    again = choose_subnet(V6ONLY, [other, mine], IPv6Address("fd00:192::9"), rng=rng)
    assert again.existing == mine and again.subnet6 == mine.ipv6_subnet


def test_every_ipv6_only_node_gets_its_own_subnet():
    """PublicIP is 0.0.0.0 on every IPv6-only node: it must not make them share a lease."""
    leases: list[Lease] = []
    for n in range(1, 6):
        ip6 = IPv6Address(f"fd00:192::{n}")
        choice = choose_subnet(V6ONLY, leases, ip6, rng=random.Random(n))
        assert choice.existing is None
        leases.append(lease6(str(choice.subnet6), str(ip6), n, n))
    assert len({lease.ipv6_subnet for lease in leases}) == 5


# -- subnet.env, rules, interface ------------------------------------------------------------
def test_subnet_env_of_an_ipv6_only_lease_has_no_ipv4_lines():
    net6, sub6 = IPv6Network("fd00:10:244::/56"), IPv6Network("fd00:10:244:3::/64")
    text = subnetenv.render(None, NO_IPV4, 1430, True, net6, sub6)
    assert text == (
        "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\n"
        "FLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\n"
        "FLANNEL_MTU=1430\n"
        "FLANNEL_IPMASQ=true\n"
    )


def test_ipv6_only_rules_have_no_ipv4_chains():
    rs = rules(
        None,
        NO_IPV4,
        True,
        True,
        network6=IPv6Network("fd00:10:244::/56"),
        subnet6=IPv6Network("fd00:10:244:3::/64"),
    )
    assert rs.chains and {c.family for c in rs.chains} == {6}


def test_an_interface_with_ipv6_alone_is_selected_with_no_ipv4_address():
    links = [
        Link("lo", 1, 65536, (IPv4Address("127.0.0.1"),)),
        Link("eth0", 2, 1500, (), (), (IPv6Address("fd00:192::5"),),
             (IPv6Network("fd00:192::/64"),)),
    ]  # fmt: skip
    for ext in (select(links, ["eth0"], [], None), select(links, [], [], 2)):
        assert ext.name == "eth0" and ext.ext_addr == NO_ADDRESS
        assert ext.ext_addr6 == IPv6Address("fd00:192::5")
    with pytest.raises(InterfaceError):
        select([Link("eth1", 3, 1500, ())], ["eth1"], [], None)


# -- the plans -------------------------------------------------------------------------------
def test_host_gw_plans_ipv6_routes_alone_in_an_ipv6_only_network():
    local = lease6("fd00:10:244:1::/64", "fd00:192::1", 1, 1, "host-gw")
    peers = {
        p.ident: p
        for p in (
            lease6("fd00:10:244:2::/64", "fd00:192::2", 2, 2, "host-gw"),
            lease6("fd00:10:244:3::/64", "fd00:192::3", 3, 3, "host-gw"),
        )
    }
    routes, warnings = hostgw.plan(local, peers, 2)
    assert warnings == []
    assert routes == {
        Route(IPv6Network("fd00:10:244:2::/64"), IPv6Address("fd00:192::2"), 2),
        Route(IPv6Network("fd00:10:244:3::/64"), IPv6Address("fd00:192::3"), 2),
    }


def test_vxlan_plans_ipv6_entries_alone_in_an_ipv6_only_network():
    local = lease6("fd00:10:244:1::/64", "fd00:192::1", 1, 1)
    peer = lease6("fd00:10:244:2::/64", "fd00:192::2", 2, 2)
    entries, warnings = vxlanplan.plan(local, {peer.ident: peer}, 0, None, 2, 9)
    assert warnings == []
    gw = IPv6Address("fd00:10:244:2::")
    assert entries == {
        Neigh(9, gw, MAC6.format(2)),
        Fdb(9, MAC6.format(2), IPv6Address("fd00:192::2")),
        Route(IPv6Network("fd00:10:244:2::/64"), gw, 9, onlink=True),
    }


def test_flannelctl_status_text_of_an_ipv6_only_node():
    from flanneld.face.ctl import render_status

    doc = {
        "ready": True, "version": "x", "network": None, "ipv6_network": "fd00:10:244::/56",
        "backend": "vxlan", "mtu": 1430,
        "etcd": {"endpoint": "http://e:2379", "reachable": True, "last_error": None},
        "config": {"source": "etcd", "problem": None},
        "public_ip": "0.0.0.0", "public_ipv6": "fd00:192::1",
        "lease": {"subnet": None, "ipv6_subnet": "fd00:10:244:1::/64", "reservation": False,
                  "expires_in": 86000, "renew_in": 82000},
        "peers": [{"subnet": None, "public_ip": "0.0.0.0", "ipv6_subnet": "fd00:10:244:2::/64",
                   "public_ipv6": "fd00:192::2", "backend_type": "vxlan", "last_change": None,
                   "missing": [], "state": "ok"}],
        "rejected": [],
    }  # fmt: skip
    text = render_status(doc)
    assert "lease     fd00:10:244:1::/64 (public IP fd00:192::1)" in text
    assert "None" not in text
    peer = next(line for line in text.splitlines() if "fd00:10:244:2::/64" in line)
    assert peer.split()[:4] == ["-", "0.0.0.0", "fd00:10:244:2::/64", "fd00:192::2"]
