"""The host-gw backend: a plain kernel route `<peer subnet> via <peer PublicIP>` per peer.

Needs L2 adjacency between nodes (every PublicIP on-link on the underlay interface). The pure
`plan` gives the routes; `reconcile` makes the main table match it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from ipaddress import IPv4Network

from pyroute2 import AsyncIPRoute

from flanneld.lease import Lease, LeaseAttrs

from . import netlink, register
from .base import Backend, BackendContext, BackendError, ReconcileResult
from .reconcile import KernelView, Route, diff

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
        gateway = peer.attrs.public_ip
        if subnet == local.subnet:
            warnings.append(f"skipping peer lease {subnet} (PublicIP {gateway}): it is our subnet")
        elif gateway == local.attrs.public_ip:
            warnings.append(
                f"skipping peer lease {subnet}: its PublicIP {gateway} is ours; "
                "two nodes must not share a public address"
            )
        elif peer.attrs.backend_type.lower() != TYPE:
            warnings.append(
                f"skipping peer lease {subnet} (PublicIP {gateway}): its BackendType is "
                f"{peer.attrs.backend_type!r}, not {TYPE!r}; run one backend type per network"
            )
        else:
            routes.add(Route(dst=subnet, gateway=gateway, oif=oif))
    return routes, warnings


@register(TYPE)
class HostGwBackend(Backend):
    """`netns` targets a named namespace (tests); the agent runs inside its own and omits it."""

    def __init__(self, ctx: BackendContext, netns: str | None = None) -> None:
        super().__init__(ctx)
        self._netns = netns
        self._ipr: AsyncIPRoute | None = None
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()  # warnings of the last pass: each is logged when it appears
        self._desired: set[Route] = set()  # the last plan: a missing member was deleted by hand
        self._view = KernelView()

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

    async def reconcile(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool = True
    ) -> ReconcileResult:
        desired, warnings = plan(lease, peers, self.ctx.ext.index)
        for warning in warnings:
            if warning not in self._warned:
                log.warning("%s", warning)
        self._warned = set(warnings)
        async with self._lock:
            if self._ipr is None:
                self._ipr = netlink.open_ipr(self._netns)
            try:
                if full or not self._view.known:
                    # Our routes on any device: one of ours on another device is stale.
                    self._view.refresh(await netlink.dump_routes(self._ipr))
                actual = self._view.entries()
                result = ReconcileResult()
                done = await netlink.apply(self._ipr, diff(desired, actual), result)
                self._view.applied(done.upserted, done.removed)
            except Exception:
                await self.close()  # a broken socket: the next pass opens a fresh one
                raise
        before = {r.dst: r for r in actual}
        for route in done.removed:
            log.info("route removed: %s via %s", route.dst, route.gateway)
        for route in done.upserted:
            old = before.get(route.dst)
            if old is not None:
                was = f"via {old.gateway} dev #{old.oif}"
                log.info("route changed: %s via %s (was %s)", route.dst, route.gateway, was)
            elif route in self._desired:
                log.info("route restored: %s via %s", route.dst, route.gateway)
            else:
                log.info("route added: %s via %s", route.dst, route.gateway)
        self._desired = desired
        return result

    async def close(self) -> None:
        self._view.invalidate()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
