"""The host-gw backend: a plain kernel route `<peer subnet> via <peer PublicIP>` per peer,
and in a dual-stack network `<peer IPv6 subnet> via <peer PublicIPv6>` too (in an IPv6-only
network, that one alone).

Needs L2 adjacency between nodes (every PublicIP on-link on the underlay interface). The pure
`plan` gives the routes; `KernelBackend` makes the main table match it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from ipaddress import IPv4Network

from pyroute2.iproute.linux import AsyncIPRoute

from flanneld.core.interfaces import NO_ADDRESS
from flanneld.core.lease import Lease, LeaseAttrs

from .base import BackendError, skip_reason
from .kernel import KernelBackend
from .plancache import Planner
from .reconcile import Entry, Route
from .registry import register
from .rtnl import Known, Rtnl

log = logging.getLogger(__name__)

TYPE = "host-gw"


def plan(
    local: Lease, peers: Mapping[IPv4Network, Lease], oif: int
) -> tuple[set[Route], list[str]]:
    """The routes to program for `peers`, and one warning per peer skipped.

    Skipped: a lease of another backend type, our own subnet, a lease claiming our PublicIP.
    A peer's IPv6 subnet gets a route when our lease has one too (a dual-stack network) and
    the peer names its PublicIPv6; every peer is planned the same way however it was learned.
    """
    routes: set[Route] = set()
    warnings: list[str] = []
    for subnet, peer in sorted(peers.items()):
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            warnings.append(why)
            continue
        if local.has_ipv4 and peer.has_ipv4:
            routes.add(Route(dst=subnet, gateway=peer.attrs.public_ip, oif=oif))
        gateway6 = peer.attrs.public_ipv6
        if local.ipv6_subnet is not None and peer.ipv6_subnet is not None and gateway6:
            routes.add(Route(dst=peer.ipv6_subnet, gateway=gateway6, oif=oif))
    return routes, warnings


@register(TYPE)
class HostGwBackend(KernelBackend):
    @property
    def mtu(self) -> int:
        return self.ctx.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        ext, config = self.ctx.ext, self.ctx.config
        if config.ipv4 and ext.ext_addr != ext.iface_addr:
            raise BackendError(
                f"--public-ip {ext.ext_addr} differs from the address {ext.iface_addr} of "
                f"--iface {ext.name}: --public-ip must be an address of --iface for host-gw; "
                "use vxlan behind NAT"
            )
        ipv6 = config.ipv6 is not None
        if ipv6 and ext.ext_addr6 != ext.iface_addr6:
            raise BackendError(
                f"--public-ipv6 {ext.ext_addr6} differs from the address {ext.iface_addr6} of "
                f"--iface {ext.name}: it must be an address of --iface for host-gw; use vxlan "
                "behind NAT"
            )
        return LeaseAttrs(
            public_ip=ext.ext_addr if config.ipv4 else NO_ADDRESS,
            backend_type=TYPE,
            public_ipv6=ext.ext_addr6 if ipv6 else None,
        )

    async def _planner(
        self, ipr: AsyncIPRoute, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool
    ) -> Planner:
        oif = self.ctx.ext.index
        return Planner((lease, oif), lambda some: plan(lease, some, oif))  # type: ignore[arg-type,return-value]

    async def _dump(self, rtnl: Rtnl, known: Known) -> set[Entry]:
        # Our routes on any device: one of ours on another device is stale.
        return await rtnl.dump_routes(known=known) | await rtnl.dump_routes(6, known=known)

    def _describe(self, entry: Entry) -> str:
        assert isinstance(entry, Route)
        dev = self.ctx.ext.name if entry.oif == self.ctx.ext.index else f"#{entry.oif}"
        return f"{entry.dst} via {entry.gateway} dev {dev}"
