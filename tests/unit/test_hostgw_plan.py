"""host-gw: the pure plan (peer leases to routes and warnings) and the NAT check."""

import re
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from backends import get_backend
from backends.base import BackendContext, BackendError
from backends.hostgw import HostGwBackend, plan
from backends.reconcile import Route
from flanneld.core.config import parse_config
from flanneld.core.interfaces import ExternalInterface
from flanneld.core.lease import Lease, LeaseAttrs

OIF = 3
LOCAL = Lease(IPv4Network("10.244.1.0/24"), LeaseAttrs(IPv4Address("192.0.2.10"), "host-gw"))


def peer(net: str, ip: str, backend: str = "host-gw") -> Lease:
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip), backend))


def route(net: str, ip: str) -> Route:
    return Route(IPv4Network(net), IPv4Address(ip), OIF)


P2 = peer("10.244.2.0/24", "192.0.2.11")
P3 = peer("10.244.3.0/24", "192.0.2.12")

CASES = [
    # name, peers, routes, warning fragments (one per skipped peer)
    ("no peers", [], set(), []),
    ("one peer", [P2], {route("10.244.2.0/24", "192.0.2.11")}, []),
    (
        "two peers",
        [P2, P3],
        {route("10.244.2.0/24", "192.0.2.11"), route("10.244.3.0/24", "192.0.2.12")},
        [],
    ),
    ("backend type compared without case", [peer("10.244.2.0/24", "192.0.2.11", "Host-GW")],
     {route("10.244.2.0/24", "192.0.2.11")}, []),
    ("foreign backend skipped", [P2, peer("10.244.4.0/24", "192.0.2.14", "vxlan")],
     {route("10.244.2.0/24", "192.0.2.11")}, ["10.244.4.0/24", "'vxlan'"]),
    ("record without backend type skipped", [peer("10.244.4.0/24", "192.0.2.14", "")],
     set(), ["10.244.4.0/24", "BackendType is ''"]),
    ("own subnet skipped", [LOCAL, P2], {route("10.244.2.0/24", "192.0.2.11")},
     ["10.244.1.0/24", "our subnet"]),
    ("own PublicIP skipped", [peer("10.244.5.0/24", "192.0.2.10"), P3],
     {route("10.244.3.0/24", "192.0.2.12")},
     ["10.244.5.0/24", "(PublicIP 192.0.2.10)", "PublicIP is ours"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "peers, routes, fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_plan(peers, routes, fragments) -> None:
    got, warnings = plan(LOCAL, {p.subnet: p for p in peers}, OIF)
    assert got == routes
    assert len(warnings) == (1 if fragments else 0)
    for fragment in fragments:
        assert fragment in warnings[0]


def test_gateway_change_changes_the_route() -> None:
    before, _ = plan(LOCAL, {P2.subnet: P2}, OIF)
    moved = peer("10.244.2.0/24", "192.0.2.99")
    after, _ = plan(LOCAL, {moved.subnet: moved}, OIF)
    assert before != after
    assert {r.dst for r in before} == {r.dst for r in after}


def backend(iface_addr: str, ext_addr: str) -> HostGwBackend:
    ext = ExternalInterface("eth0", OIF, IPv4Address(iface_addr), IPv4Address(ext_addr), 1450)
    config = parse_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}')
    return HostGwBackend(BackendContext(ext, config, Path("/nonexistent")))


def test_registered_under_its_type_name() -> None:
    assert get_backend("HOST-GW") is HostGwBackend


async def test_prepare_publishes_the_interface_address() -> None:
    b = backend("192.0.2.10", "192.0.2.10")
    assert b.mtu == 1450
    assert await b.prepare() == LeaseAttrs(IPv4Address("192.0.2.10"), "host-gw")


async def test_prepare_refuses_nat() -> None:
    with pytest.raises(BackendError) as e:
        await backend("192.0.2.10", "192.0.2.200").prepare()
    msg = str(e.value)
    assert "192.0.2.10" in msg and "192.0.2.200" in msg and "use vxlan behind NAT" in msg
    assert "\n" not in msg


def test_every_backend_names_the_devices_cleanup_may_remove():
    """`flannelctl cleanup` asks the backends (Backend.owned_devices) instead of keeping names."""
    owned = {name: get_backend(name).owned_devices() for name in ("host-gw", "vxlan", "udp")}
    assert owned["host-gw"] == ()
    [(kind, pattern)] = owned["vxlan"]
    assert kind == "vxlan" and re.fullmatch(pattern, "flannel.1")
    assert re.fullmatch(pattern, "flannel-v6.1")  # the dual-stack device
    assert not re.fullmatch(pattern, "flannel0") and not re.fullmatch(pattern, "eth0")
    [(kind, pattern)] = owned["udp"]
    assert kind == "tun" and re.fullmatch(pattern, "flannel0")
    assert not re.fullmatch(pattern, "flannel.1") and not re.fullmatch(pattern, "cni0")
