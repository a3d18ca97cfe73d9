"""The host-gw backend: a plain kernel route `<peer subnet> via <peer PublicIP>` per peer.

Needs L2 adjacency between nodes (every PublicIP on-link on the underlay interface). The pure
`plan` gives the routes; `KernelBackend` makes the main table match it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from ipaddress import IPv4Network

from pyroute2 import AsyncIPRoute

from flanneld.core.lease import Lease, LeaseAttrs

from . import netlink
from .base import BackendError, skip_reason
from .kernel import KernelBackend
from .reconcile import Entry, Route
from .registry import register

log = logging.getLogger(__name__)

TYPE = "host-gw"


def plan(
    local: Lease, peers: Mapping[IPv4Network, Lease], oif: int
) -> tuple[set[Route], list[str]]:
    """The routes to program for `peers`, and one warning per peer skipped.

    Skipped: a lease of another backend type, our own subnet, a lease claiming our PublicIP.
    """
    routes: set[Route] = set()
    warnings: list[str] = []
    for subnet, peer in sorted(peers.items()):
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            warnings.append(why)
        else:
            routes.add(Route(dst=subnet, gateway=peer.attrs.public_ip, oif=oif))
    return routes, warnings


@register(TYPE)
class HostGwBackend(KernelBackend):
    @property
    def mtu(self) -> int:
        return self.ctx.ext.mtu

    async def prepare(self) -> LeaseAttrs:
        ext = self.ctx.ext
        if ext.ext_addr != ext.iface_addr:
            raise BackendError(
                f"--public-ip {ext.ext_addr} differs from the address {ext.iface_addr} of "
                f"--iface {ext.name}: --public-ip must be an address of --iface for host-gw; "
                "use vxlan behind NAT"
            )
        return LeaseAttrs(public_ip=ext.ext_addr, backend_type=TYPE)

    async def _plan(
        self, ipr: AsyncIPRoute, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool
    ) -> tuple[set[Entry], list[str]]:
        routes, warnings = plan(lease, peers, self.ctx.ext.index)
        return set(routes), warnings

    async def _dump(self, ipr: AsyncIPRoute) -> set[Entry]:
        # Our routes on any device: one of ours on another device is stale.
        return set(await netlink.dump_routes(ipr))

    def _describe(self, entry: Entry) -> str:
        assert isinstance(entry, Route)
        dev = self.ctx.ext.name if entry.oif == self.ctx.ext.index else f"#{entry.oif}"
        return f"{entry.dst} via {entry.gateway} dev {dev}"
