"""Hostile lease records (issue 12, item 1): the rules a record must pass, the peer table that
applies them, and a property test over random record sets driving the real backend plans."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.hostgw import plan as hostgw_plan
from backends.reconcile import Route
from backends.udp import plan as udp_plan
from backends.vxlanplan import plan as vxlan_plan
from flanneld.core.admission import PeerRules
from flanneld.core.config import parse_config
from flanneld.core.lease import Lease, LeaseAttrs, RecordError
from flanneld.core.peers import PeerTable, Rejected, Snapshot, WatchEvent
from flanneld.core.subnets import parse_subnet_key, subnet_key

CFG = parse_config(b'{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
RULES = PeerRules(CFG, IPv4Address("192.0.2.10"))
OWN = IPv4Network("10.244.1.0/24")


def lease(net: str, ip: str = "192.0.2.11", created: int = 0) -> Lease:
    return Lease(
        IPv4Network(net), LeaseAttrs(IPv4Address(ip), "host-gw"), 7, create_revision=created
    )


# fmt: off
REJECTED = [
    ("the default route", "0.0.0.0/0", "192.0.2.11", "outside_network"),
    ("outside Network", "198.51.100.0/24", "192.0.2.11", "outside_network"),
    ("a /8 around Network", "10.0.0.0/8", "192.0.2.11", "outside_network"),
    ("a /25 inside our /24", "10.244.1.0/25", "192.0.2.11", "subnet_len"),
    ("a /16: all of Network", "10.244.0.0/16", "192.0.2.11", "subnet_len"),
    ("a /26 elsewhere", "10.244.9.64/26", "192.0.2.11", "subnet_len"),
    ("PublicIP 0.0.0.0", "10.244.2.0/24", "0.0.0.0", "public_ip"),
    ("PublicIP loopback", "10.244.2.0/24", "127.0.0.1", "public_ip"),
    ("PublicIP multicast", "10.244.2.0/24", "224.0.0.5", "public_ip"),
    ("PublicIP broadcast", "10.244.2.0/24", "255.255.255.255", "public_ip"),
    ("PublicIP reserved", "10.244.2.0/24", "240.0.0.1", "public_ip"),
    ("PublicIP link-local", "10.244.2.0/24", "169.254.1.1", "public_ip"),
    ("PublicIP inside the overlay", "10.244.2.0/24", "10.244.7.1", "public_ip"),
]
# fmt: on


@pytest.mark.parametrize("net, ip, rule", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rules_reject(net, ip, rule):
    with pytest.raises(RecordError) as e:
        RULES.check(lease(net, ip))
    assert e.value.rule == rule


@pytest.mark.parametrize("ip", ["192.0.2.11", "198.18.0.5", "10.1.2.3", "172.16.0.1"])
def test_rules_accept_ordinary_records(ip):
    RULES.check(lease("10.244.2.0/24", ip))


def test_link_local_public_ip_accepted_when_our_own_is_link_local():
    PeerRules(CFG, IPv4Address("169.254.0.10")).check(lease("10.244.2.0/24", "169.254.1.1"))


@pytest.mark.parametrize(
    "key",
    ["10.244.3.0-024", "010.244.3.0-24", "10.244.3.00-24", "10.244.3.0-24 ", "10.244.3.0-+24"],
)
def test_non_canonical_keys_name_no_subnet(key):
    assert parse_subnet_key(key) is None


# -- the table applies the rules -------------------------------------------------------------
def table() -> PeerTable:
    return PeerTable(RULES.check)


def test_rejected_records_never_enter_the_table_and_are_counted():
    t = table()
    snap = Snapshot(
        {
            r.key: r
            for r in (
                lease("10.244.2.0/24"),
                lease("0.0.0.0/0"),
                lease("10.244.1.0/25"),
                lease("198.51.100.0/24"),
            )
        },
        {"10.244.3.0-024": Rejected("key", "not canonical")},
        5,
    )
    changes = t.reset(snap)
    assert [(c.kind, str(c.subnet)) for c in changes] == [("added", "10.244.2.0/24")]
    assert set(t.leases) == {IPv4Network("10.244.2.0/24")}
    assert t.rejected_by_rule() == {"outside_network": 2, "subnet_len": 1, "key": 1}


def test_a_record_turning_hostile_keeps_its_last_good_one_and_recovers():
    t = table()
    net = IPv4Network("10.244.2.0/24")
    t.apply(WatchEvent(subnet_key(net), net, lease("10.244.2.0/24"), revision=2))
    assert t.apply(WatchEvent(subnet_key(net), net, lease("10.244.2.0/24", "127.0.0.1"))) == []
    assert t.leases[net].attrs.public_ip == IPv4Address("192.0.2.11")
    assert t.rejected_by_rule() == {"public_ip": 1}
    back = t.apply(WatchEvent(subnet_key(net), net, lease("10.244.2.0/24", "192.0.2.12")))
    assert [c.kind for c in back] == ["changed"]
    assert t.rejected == {}


def test_deleting_a_rejected_key_clears_it_and_touches_no_peer():
    t = table()
    net = IPv4Network("10.244.2.0/24")
    t.apply(WatchEvent(subnet_key(net), net, lease("10.244.2.0/24"), revision=2))
    t.apply(WatchEvent("10.244.2.0-024", None, None, Rejected("key", "not canonical"), 3))
    assert t.apply(WatchEvent("10.244.2.0-024", None, None, revision=4)) == []
    assert set(t.leases) == {net} and t.rejected == {}


# -- after etcd lost its data ----------------------------------------------------------------
def test_data_loss_keeps_missing_peers_until_they_return_or_the_grace_ends():
    t = table()
    a, b, c = (IPv4Network(f"10.244.{i}.0/24") for i in (2, 3, 4))
    t.reset(Snapshot({subnet_key(n): lease(str(n)) for n in (a, b, c)}, {}, 50))
    assert t.reset(Snapshot({subnet_key(a): lease(str(a))}, {}, 3), keep_missing=True) == []
    assert set(t.leases) == {a, b, c} and t.unconfirmed == {b, c}
    # another re-list during the grace does not drop them either
    assert t.reset(Snapshot({subnet_key(a): lease(str(a))}, {}, 4)) == []
    # b registers again (a new etcd lease, same record): confirmed, no change
    assert t.apply(WatchEvent(subnet_key(b), b, lease(str(b)), revision=5)) == []
    assert t.unconfirmed == {c}
    gone = t.expire_unconfirmed()
    assert [(ch.kind, ch.subnet) for ch in gone] == [("removed", c)]
    assert set(t.leases) == {a, b}


# -- property: whatever is in etcd, no planned entry leaves Network or covers our lease ------
ips = st.sampled_from(
    ["192.0.2.11", "192.0.2.12", "192.0.2.10", "0.0.0.0", "127.0.0.1", "224.0.0.1",
     "10.244.5.5", "169.254.3.3", "255.255.255.255", "198.18.1.1"]
)  # fmt: skip
nets = st.builds(
    lambda a, plen: IPv4Network((a, plen), strict=False),
    st.one_of(
        st.integers(0, 2**32 - 1),
        st.integers(int(IPv4Address("10.244.0.0")), int(IPv4Address("10.244.255.255"))),
    ),
    st.sampled_from([0, 8, 16, 23, 24, 24, 24, 25, 32]),
)
records = st.lists(st.tuples(nets, ips, st.integers(1, 1000)), max_size=25)


@settings(max_examples=300, deadline=None)
@given(records)
def test_no_planned_entry_outside_network_or_over_our_lease(recs):
    t = table()
    local = Lease(OWN, LeaseAttrs(IPv4Address("192.0.2.10"), "host-gw"), 1)
    leases = {}
    for net, ip, created in recs:
        attrs = LeaseAttrs(IPv4Address(ip), "host-gw", {"VtepMAC": "0a:00:00:00:00:07"})
        leases[subnet_key(net)] = Lease(net, attrs, 3, create_revision=created)
    t.reset(Snapshot(leases, {}, 9))
    peers = {s: p for s, p in t.leases.items() if s != OWN}
    routes, _ = hostgw_plan(local, peers, 2)
    vx_peers = {
        s: Lease(s, LeaseAttrs(p.attrs.public_ip, "vxlan", p.attrs.backend_data), 3)
        for s, p in peers.items()
    }
    vx_local = Lease(OWN, LeaseAttrs(IPv4Address("192.0.2.10"), "vxlan"), 1)
    vx_entries, _ = vxlan_plan(vx_local, vx_peers, 5, None, 2)
    udp_routes, _ = udp_plan(
        local,
        {s: Lease(s, LeaseAttrs(p.attrs.public_ip), 3) for s, p in peers.items()},
        CFG.network,
        CFG.subnet_len,
        8285,
    )
    dsts = [r.dst for r in routes] + [e.dst for e in vx_entries if isinstance(e, Route)]
    dsts += [p.subnet for p in udp_routes.peers]
    for dst in dsts:
        assert dst.subnet_of(CFG.network), dst
        assert not dst.overlaps(OWN), dst
    for r in routes:
        assert r.gateway not in CFG.network and not r.gateway.is_loopback
    planned = sorted(set(dsts))
    for x, y in zip(planned, planned[1:], strict=False):
        assert not x.overlaps(y), (x, y)
