"""The lean rtnetlink codec without a kernel: a request's body read back by the dump parsers
gives the entry it was made from (both families), and what a dump filters out."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from backends.reconcile import Fdb, Neigh, Route
from backends.rtnl import (
    RTM_DELNEXTHOP,
    RTM_DELROUTE,
    RTM_NEWNEXTHOP,
    RTM_NEWROUTE,
    _message,
    fdb_request,
    messages,
    neigh_request,
    nexthop_id,
    parse_fdb,
    parse_neigh,
    parse_nexthop,
    parse_route,
    requests,
    route_request,
)

ROUTES = [
    Route(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.11"), 3),
    Route(IPv4Network("10.244.3.0/24"), IPv4Address("10.244.3.0"), 7, onlink=True),
    Route(IPv4Network("10.244.0.0/16"), None, 9),
    Route(IPv6Network("fd00:10:244:2::/64"), IPv6Address("fd00:192::11"), 3),
    Route(IPv6Network("fd00:10:244:3::/64"), IPv6Address("fd00:10:244:3::"), 8, onlink=True),
]


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_a_route_request_reads_back_as_the_route(route):
    kind, flags, body = route_request(route, delete=False)
    assert kind == RTM_NEWROUTE and flags
    assert parse_route(memoryview(body)) == route


def test_a_route_delete_names_our_protocol_and_every_field():
    kind, _, body = route_request(ROUTES[0], delete=True)
    assert kind == RTM_DELROUTE
    assert parse_route(memoryview(body)) == ROUTES[0]  # protocol 155, dst, gateway, device


@pytest.mark.parametrize(
    "neigh",
    [
        Neigh(5, IPv4Address("10.244.2.0"), "0a:00:00:00:00:02"),
        Neigh(6, IPv6Address("fd00:10:244:2::"), "0a:00:00:00:01:02"),
    ],
    ids=str,
)
def test_a_neighbour_request_reads_back_on_its_device_only(neigh):
    _, _, body = neigh_request(neigh, delete=False)
    assert parse_neigh(memoryview(body), neigh.ifindex) == neigh
    assert parse_neigh(memoryview(body), neigh.ifindex + 1) is None


@pytest.mark.parametrize(
    "fdb",
    [
        Fdb(5, "0a:00:00:00:00:02", IPv4Address("192.0.2.11")),
        Fdb(6, "0a:00:00:00:01:02", IPv6Address("fd00:192::11")),
    ],
    ids=str,
)
def test_an_fdb_request_reads_back(fdb):
    _, _, body = fdb_request(fdb, delete=False)
    assert parse_fdb(memoryview(body), fdb.ifindex) == fdb


@pytest.mark.parametrize("mac", ["00:00:00:00:00:00", "01:00:5e:00:00:01"])
def test_flooding_fdb_entries_are_not_ours(mac):
    _, _, body = fdb_request(Fdb(5, mac, IPv4Address("192.0.2.99")), delete=False)
    assert parse_fdb(memoryview(body), 5) is None


def test_routes_of_other_protocols_or_tables_are_not_ours():
    _, _, body = route_request(ROUTES[0], delete=False)
    foreign = bytearray(body)
    foreign[5] = 3  # protocol "boot"
    assert parse_route(memoryview(bytes(foreign))) is None
    other_table = bytearray(body)
    other_table[4] = 100
    assert parse_route(memoryview(bytes(other_table))) is None


def test_messages_split_a_receive_and_stop_at_a_truncated_tail():
    one = _message(RTM_NEWROUTE, 0, route_request(ROUTES[0], False)[2], 7)
    two = _message(RTM_NEWROUTE, 0, route_request(ROUTES[3], False)[2], 8)
    got = list(messages(one + two + two[:10]))
    assert [(kind, seq) for kind, _, seq, _ in got] == [(RTM_NEWROUTE, 7), (RTM_NEWROUTE, 8)]
    assert [parse_route(body) for *_, body in got] == [ROUTES[0], ROUTES[3]]


def test_nexthop_ids_are_one_per_ipv4_destination_and_none_for_the_rest():
    nets = [IPv4Network((a << 8, 24)) for a in range(0, 1 << 24, 4099)]
    nets += [IPv4Network("10.0.0.0/16"), IPv4Network("10.0.0.0/8"), IPv4Network("10.0.0.0/30")]
    ids = [nexthop_id(Route(n, IPv4Address("192.0.2.1"), 3)) for n in nets]
    assert len(set(ids)) == len(ids) and all(0 < i < 1 << 32 for i in ids)
    assert nexthop_id(ROUTES[2]) == 0  # no gateway
    assert nexthop_id(ROUTES[3]) == 0  # IPv6: one route object per route anyway
    assert nexthop_id(Route(IPv4Network("10.1.2.3/32"), IPv4Address("192.0.2.1"), 3)) == 0


def test_a_route_with_a_gateway_is_installed_through_its_nexthop_and_reads_back():
    route = ROUTES[1]
    (hop_kind, _, hop), (kind, _, body) = requests(route, delete=False)
    assert (hop_kind, kind) == (RTM_NEWNEXTHOP, RTM_NEWROUTE)
    nhid, proto, fields = parse_nexthop(memoryview(hop))
    assert nhid == nexthop_id(route) and proto == 155
    # dumped without its gateway (nexthop_compat_mode off): completed from our objects
    assert parse_route(memoryview(body), hops={nhid: fields}) == route
    (route_del, _, _), (hop_del, _, _) = requests(route, delete=True)
    assert (route_del, hop_del) == (RTM_DELROUTE, RTM_DELNEXTHOP)
    # an id held by someone else's object: the route names its gateway
    [(kind, _, body)] = requests(route, delete=False, foreign={nhid})
    assert kind == RTM_NEWROUTE and parse_route(memoryview(body)) == route
