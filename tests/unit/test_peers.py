from ipaddress import IPv4Address, IPv4Network

from flanneld.core.lease import Lease, LeaseAttrs
from flanneld.core.peers import PeerTable, Rejected, Snapshot, WatchEvent

A, B, C = (IPv4Network(f"10.5.{i}.0/24") for i in (1, 2, 3))


def lease(net, ip="192.0.2.1"):
    return Lease(net, LeaseAttrs(IPv4Address(ip), "host-gw"), 5)


def key(net):
    return f"{net.network_address}-{net.prefixlen}"


def test_reset_reports_added_changed_removed():
    t = PeerTable()
    t.reset(Snapshot({key(A): lease(A), key(B): lease(B)}, {}, 10))
    changes = t.reset(Snapshot({key(B): lease(B, "192.0.2.9"), key(C): lease(C)}, {}, 20))
    assert {(c.kind, c.subnet) for c in changes} == {("removed", A), ("changed", B), ("added", C)}


def test_reset_unchanged_is_silent():
    t = PeerTable()
    t.reset(Snapshot({key(A): lease(A)}, {}, 1))
    assert t.reset(Snapshot({key(A): lease(A)}, {}, 2)) == []


def test_bad_record_in_snapshot_keeps_last_good():
    t = PeerTable()
    t.reset(Snapshot({key(A): lease(A)}, {}, 1))
    assert t.reset(Snapshot({}, {key(A): Rejected("malformed", "not valid JSON")}, 2)) == []
    assert A in t.leases


def test_empty_snapshot_after_bad_events_is_not_inferred():
    t = PeerTable()
    t.reset(Snapshot({key(A): lease(A), key(B): lease(B)}, {}, 1))
    assert t.apply(WatchEvent("garbage", None, None, Rejected("key", "bad key"), 3)) == []
    assert t.apply(WatchEvent(key(A), A, None, Rejected("malformed", "not valid JSON"), 4)) == []
    assert set(t.leases) == {A, B}


def test_apply_events():
    t = PeerTable()
    assert [c.kind for c in t.apply(WatchEvent(key(A), A, lease(A), revision=2))] == ["added"]
    assert t.apply(WatchEvent(key(A), A, lease(A), revision=3)) == []  # same record re-put
    assert [c.kind for c in t.apply(WatchEvent(key(A), A, lease(A, "192.0.2.7"), revision=4))] == [
        "changed"
    ]
    removed = t.apply(WatchEvent(key(A), A, None, revision=5))
    assert [c.kind for c in removed] == ["removed"]
    assert removed[0].lease.attrs.public_ip == IPv4Address("192.0.2.7")  # last known record
    assert t.apply(WatchEvent(key(A), A, None, revision=6)) == []
