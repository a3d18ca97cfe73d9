"""What `flannelctl reserve` writes: a reservation's key and record in each kind of network.

A reservation is a lease key without an etcd lease. The node whose address it names takes it
as its own lease (the agent prefers a reservation), but only if it fits the network config: in
a dual-stack network a reservation needs an IPv6 half too, else the node drops it as a stale
lease of its own. So the plan is checked against the config here, before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

from .admission import unicast_problem
from .config import NO_IPV4, NetworkConfig
from .errors import InputError
from .lease import Lease, LeaseAttrs
from .subnets import ident_of, subnet_key


class ReservationError(InputError):
    """The reservation asked for cannot be made; the message says why and the fix."""


@dataclass(frozen=True)
class Reservation:
    subnet: IPv4Network  # NO_IPV4 in an IPv6-only network
    subnet6: IPv6Network | None
    attrs: LeaseAttrs

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.subnet6)

    @property
    def ident(self) -> IPv4Network | IPv6Network:
        return ident_of(self.subnet, self.subnet6)


def _net(text: str, version: int) -> IPv4Network | IPv6Network:
    try:
        net = ip_network(text, strict=True)
    except ValueError:
        net = None
    if net is None or net.version != version:
        example = "10.244.7.0/24" if version == 4 else "fd00:10:244:7::/64"
        raise ReservationError(f"{text!r} is not an IPv{version} subnet like {example}")
    return net


def _ip(text: str, version: int, what: str) -> IPv4Address | IPv6Address:
    try:
        ip = ip_address(text)
    except ValueError:
        ip = None
    if ip is None or ip.version != version:
        raise ReservationError(f"{what} {text!r} is not an IPv{version} address")
    if problem := unicast_problem(ip):
        raise ReservationError(f"{what} {text} {problem}; give the node's unicast address")
    return ip


def _half6(
    config: NetworkConfig, subnet_text: str, ip_text: str, what: str
) -> tuple[IPv6Network, IPv6Address]:
    """The IPv6 subnet, checked against the config, and the node's IPv6 address (`what`)."""
    subnet6 = _net(subnet_text, 6)
    assert isinstance(subnet6, IPv6Network) and config.ipv6 is not None
    if not config.ipv6.contains(subnet6):
        v6 = config.ipv6
        raise ReservationError(
            f"{subnet6} is outside IPv6SubnetMin..IPv6SubnetMax ({v6.subnet_min}.."
            f"{v6.subnet_max}) or not /IPv6SubnetLen ({v6.subnet_len}) of the network config; "
            "pick a subnet the config allows"
        )
    node6 = _ip(ip_text, 6, what)
    assert isinstance(node6, IPv6Address)
    return subnet6, node6


def plan_reservation(
    config: NetworkConfig | None,
    subnet_text: str,
    ip_text: str,
    backend_type: str,
    subnet6_text: str | None = None,
    ip6_text: str | None = None,
) -> Reservation:
    """The reservation of `subnet_text` for the node `ip_text` (in an IPv6-only network both
    are IPv6); in a dual-stack network with its IPv6 half, `subnet6_text` for `ip6_text`.
    `config` None: there is none in etcd yet, and only an IPv4 reservation is checked by form."""
    v6_given = subnet6_text is not None or ip6_text is not None
    if config is not None and not config.ipv4:  # IPv6-only
        if v6_given:
            raise ReservationError(
                "the network is IPv6-only: give its IPv6 subnet and the node's IPv6 address as "
                "SUBNET and PUBLIC_IP, without --ipv6-subnet/--public-ipv6"
            )
        if ":" not in subnet_text:
            raise ReservationError(
                f"the network is IPv6-only: {subnet_text!r} must be an IPv6 subnet like "
                "fd00:10:244:7::/64"
            )
        subnet6, node6 = _half6(config, subnet_text, ip_text, "PUBLIC_IP")
        attrs = LeaseAttrs(IPv4Address(0), backend_type, public_ipv6=node6)
        return Reservation(NO_IPV4, subnet6, attrs)
    if config is None and ":" in subnet_text:
        raise ReservationError(
            "there is no network config in etcd, so an IPv6 reservation cannot be checked: "
            "write the config first (flannelctl config set)"
        )
    subnet = _net(subnet_text, 4)
    assert isinstance(subnet, IPv4Network)
    node = _ip(ip_text, 4, "PUBLIC_IP")
    assert isinstance(node, IPv4Address)
    if config is not None and not config.contains_lease(subnet):
        raise ReservationError(
            f"{subnet} is outside SubnetMin..SubnetMax or not /SubnetLen of the network "
            "config; pick a subnet the config allows"
        )
    if config is None or config.ipv6 is None:
        if v6_given:
            raise ReservationError(
                "the network has no IPv6 (EnableIPv6 is off): leave out --ipv6-subnet and "
                "--public-ipv6"
            )
        return Reservation(subnet, None, LeaseAttrs(node, backend_type))
    if subnet6_text is None or ip6_text is None:
        missing = "--ipv6-subnet" if subnet6_text is None else "--public-ipv6"
        raise ReservationError(
            f"the network is dual-stack: a reservation needs its IPv6 half too ({missing}); "
            "without it the node would drop the reservation as not fitting the config"
        )
    subnet6, node6 = _half6(config, subnet6_text, ip6_text, "--public-ipv6")
    return Reservation(subnet, subnet6, LeaseAttrs(node, backend_type, public_ipv6=node6))


def overlaps(a: Lease, b: Lease) -> bool:
    """Two leases claim some of the same address space (in either family)."""
    if a.has_ipv4 and b.has_ipv4 and a.subnet.overlaps(b.subnet):
        return True
    return (
        a.ipv6_subnet is not None
        and b.ipv6_subnet is not None
        and a.ipv6_subnet.overlaps(b.ipv6_subnet)
    )


def in_the_way(plan: Reservation, leases: Iterable[Lease]) -> list[Lease]:
    """The leases a reservation would overlap. The same key held by the same node is not in
    the way: it is made a reservation in place. Anything else (another node's lease, or this
    node's lease of other subnets) must go first (`--force`), or two keys would claim one
    subnet."""
    mine = Lease(plan.subnet, plan.attrs, 0, 0, 0, plan.subnet6)
    node = plan.attrs.node_ip
    return [
        x for x in leases if overlaps(x, mine) and (x.key != plan.key or x.attrs.node_ip != node)
    ]
