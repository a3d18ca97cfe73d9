"""The wireguard backend: container traffic between nodes encrypted by WireGuard, on the
device `flannel-wg` (MTU = underlay − 80), as the reference's backend of that name.

The device holds `<subnet network address>/32` and the route for the whole cluster network
(proto 155, as the reference routes the Network onto it); each peer lease is one WireGuard peer
(its BackendData `PublicKey`, endpoint `PublicIP:ListenPort`, allowed-ips its subnet), so the
device's own routing picks the peer. The kernel's WireGuard is used where the kernel has it
(`kerneldev`), else a wireguard-go child (`userspace`): one log line says which. The pure
parts: `options`, `keys` (X25519), `uapi` (the configuration as data and as UAPI text) and
`plan`; `keyfile` keeps the private key. IPv4 only (EnableIPv6 is refused with one line).

Reconcile as the other backends: the plan's peers against the device's (read afresh on full
passes, followed in between), a removed lease's peer removed, a changed key replaced (a new
peer for the new key, the old one removed), a hand-removed peer restored, a deleted device
(or a dead wireguard-go) made again and every peer replayed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Mapping
from ipaddress import IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from flanneld.core.lease import Lease, LeaseAttrs

from .. import netlink
from ..base import Backend, BackendContext, BackendError, ReconcileResult
from ..reconcile import KernelView, Route, diff
from ..registry import register
from ..rtnl import Rtnl
from .kerneldev import KernelDevice
from .keyfile import key_path, load_or_create, load_psk
from .keys import encode_key, public_key
from .options import WireguardOptions, parse_options
from .plan import TYPE, plan
from .uapi import NO_KEY, PeerConfig, UapiError
from .userspace import UserspaceDevice

log = logging.getLogger(__name__)

DEVICE = "flannel-wg"
ENCAP_OVERHEAD = 80  # outer IPv6 40 + UDP 8 + WireGuard 32, as the reference counts
MIN_MTU = 68

Device = KernelDevice | UserspaceDevice


@register(TYPE)
class WireguardBackend(Backend):
    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> WireguardOptions:
        return parse_options(options)

    @classmethod
    def owned_devices(cls) -> tuple[tuple[str, str], ...]:
        # the kernel's device, or wireguard-go's TUN (deleting it ends wireguard-go)
        return (("wireguard", r"flannel-wg(-v6)?"), ("tun", r"flannel-wg(-v6)?"))

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.opts = WireguardOptions()  # the validated ones from prepare() on
        self.device: Device | None = None
        self._private = NO_KEY
        self._psk: bytes | None = None
        self._ipr: AsyncIPRoute | None = None
        self._rtnl: Rtnl | None = None
        self._lock = asyncio.Lock()
        self._view = KernelView()  # the device's peers: read on full passes, followed between
        self._desired: set[PeerConfig] = set()
        self._warned: set[str] = set()
        self._routes: set[Route] = set()
        self.skipped = 0  # peer leases the last pass could not use (bad or missing key)

    @property
    def public_key(self) -> bytes:
        return public_key(self._private)

    @property
    def mtu(self) -> int:
        return self.ctx.ext.mtu - ENCAP_OVERHEAD

    def stats(self) -> dict[str, int]:
        out = {"peers_skipped": self.skipped}
        if isinstance(self.device, UserspaceDevice):
            out["wireguard_go_starts"] = self.device.starts
        return out

    def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            self._ipr = netlink.open_ipr()
        return self._ipr

    # -- start --------------------------------------------------------------------------------
    async def prepare(self) -> LeaseAttrs:
        self.opts = parse_options(self.ctx.options)
        if self.ctx.config.ipv6 is not None:
            raise BackendError(
                "EnableIPv6 is set, but this agent's wireguard backend carries IPv4 only; "
                "use host-gw or vxlan for dual-stack, or remove EnableIPv6"
            )
        if self.mtu < MIN_MTU:
            raise BackendError(
                f"the MTU of {self.ctx.ext.name} ({self.ctx.ext.mtu}) leaves less than {MIN_MTU} "
                f"bytes after {ENCAP_OVERHEAD} bytes of WireGuard overhead; use a larger MTU"
            )
        path = key_path(os.environ, self.ctx.state_dir)
        self._private, created = load_or_create(path)
        self._psk = load_psk(os.environ) or self.opts.psk
        pub = encode_key(self.public_key)
        log.info("wireguard: public key %s (%s %s)", pub, "new key in" if created else "key", path)
        async with self._lock:
            try:
                self.device = await self._choose()
                await self.device.ensure()
                await self._settings(True)
            except (NetlinkError, UapiError, OSError) as e:
                await self.close()
                raise BackendError(f"cannot set up WireGuard device {DEVICE}: {e}") from None
        return LeaseAttrs(self.ctx.ext.ext_addr, TYPE, {"PublicKey": pub})

    async def _choose(self) -> Device:
        """The kernel's device where the kernel has WireGuard, else wireguard-go; one line.
        A wireguard-go left serving this state directory's socket is kept (adopted)."""
        userspace = UserspaceDevice(DEVICE, self.ctx.state_dir / "wireguard")
        if userspace.socket_path.exists() and await userspace.answers():
            log.info("wireguard: device %s: userspace, %s still serving it", DEVICE, userspace)
            return userspace
        ipr = self._socket()
        if await KernelDevice.create(ipr, DEVICE):
            log.info("wireguard: device %s: the kernel's WireGuard", DEVICE)
            return KernelDevice(DEVICE, self._socket)
        if why := UserspaceDevice.available():
            raise BackendError(f"the kernel has no WireGuard and {why}")
        log.info(
            "wireguard: device %s: the kernel has no WireGuard; userspace wireguard-go, "
            "configured on %s",
            DEVICE,
            userspace.socket_path,
        )
        return userspace

    async def _settings(self, fresh: bool) -> None:
        """The device's private key and listen port as they must be (read back when `fresh`)."""
        assert self.device is not None
        state = await self.device.get() if fresh else None
        stale = state is None or state.private_key != self._private
        key = self._private if stale else None
        port = self.opts.listen_port
        if state is not None and state.listen_port == port:
            port = None
        if key is None and port is None:
            return
        try:
            await self.device.set(private_key=key, listen_port=port)
        except (UapiError, NetlinkError) as e:
            code = getattr(e, "errno", None) or getattr(e, "code", 0)
            if code in (errno.EADDRINUSE, -errno.EADDRINUSE):
                raise BackendError(
                    f"UDP port {self.opts.listen_port} is taken on this node; stop what uses it "
                    "or set Backend.ListenPort"
                ) from None
            raise
        if state is not None and key is not None and state.private_key != NO_KEY:
            log.warning("wireguard: device %s had another private key; set to ours", DEVICE)

    async def _configure_link(self, lease: Lease) -> int:
        """MTU, `<subnet network address>/32` as its only flannel address, up; its index."""
        ipr = self._socket()
        [link] = await ipr.link("get", ifname=DEVICE)
        index = link["index"]
        if link.get("mtu") != self.mtu:
            await ipr.link("set", index=index, mtu=self.mtu)
            log.info("device %s: MTU %d", DEVICE, self.mtu)
        await netlink.own_address_up(ipr, link, lease.subnet, self.ctx.config.network)
        return index

    async def _sync_route(self, index: int, result: ReconcileResult) -> None:
        """The one route of the cluster network via the device; any other proto-155 route is
        stale."""
        if self._rtnl is None:
            self._rtnl = Rtnl()
        desired = {Route(dst=self.ctx.config.network, gateway=None, oif=index)}
        actual = await self._rtnl.dump_routes()
        done = await netlink.apply(self._rtnl, diff(desired, actual), result)
        done.report(actual, self._routes, result, lambda r: f"{r.dst} dev {DEVICE}")
        self._routes = desired

    async def configure(self, lease: Lease) -> None:
        async with self._lock:
            try:
                await self._sync_route(await self._configure_link(lease), ReconcileResult())
            except Exception:
                await self.close()
                raise

    # -- steady state ---------------------------------------------------------------------------
    async def intact(self) -> bool:
        """wireguard-go alive (or, adopted, answering) and the device there and up."""
        device = self.device
        if device is None:
            return True
        async with self._lock:
            if isinstance(device, UserspaceDevice):
                alive = device.child_alive()
                if alive is False or (alive is None and not await device.answers()):
                    return False
            try:
                [link] = await self._socket().link("get", ifname=DEVICE)
            except NetlinkError:
                return False
            except Exception:
                await self.close()
                raise
        return bool(link["flags"] & IFF_UP)

    def _plan(self, lease: Lease, peers: Mapping[IPv4Network, Lease]) -> set[PeerConfig]:
        desired, warnings = plan(
            lease, peers, self.opts.listen_port, self.opts.keepalive, self._psk
        )
        for warning in warnings:
            if warning not in self._warned:
                log.warning("%s", warning)
        self._warned = set(warnings)
        self.skipped = sum("skipping peer lease" in w for w in warnings)
        return desired

    async def reconcile(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool = True
    ) -> ReconcileResult:
        assert self.device is not None
        result = ReconcileResult()
        async with self._lock:
            try:
                if await self.device.ensure(cheap=not full):
                    log.warning("wireguard: device %s made again; replaying every peer", DEVICE)
                    self._view.invalidate()
                    await self._settings(False)
                    full = True
                desired = self._plan(lease, peers)
                if full:
                    await self._settings(True)
                    await self._sync_route(await self._configure_link(lease), result)
                if full or not self._view.known:
                    self._view.refresh((await self.device.get()).peers.values())
                actual = {p.public_key: p for p in self._view.entries()}
                change = diff(desired, actual.values())
                removes = sorted(p.public_key for p in change.remove)
                upserts = sorted(change.upsert, key=lambda p: p.public_key)
                if removes or upserts:
                    await self.device.set(remove=removes, upsert=upserts)
                    self._view.applied(upserts, change.remove)
            except Exception:
                await self.close()  # the next pass starts from a fresh socket and a fresh read
                raise
        self._report(actual, change.remove, upserts, result)
        self._desired = desired
        return result

    def _report(
        self,
        actual: dict[bytes, PeerConfig],
        removed: frozenset[PeerConfig],
        upserted: list[PeerConfig],
        result: ReconcileResult,
    ) -> None:
        """One line per peer changed; a peer added again that the last plan had too was
        removed behind our back: counted as repaired."""
        for peer in removed:
            result.count(result.removed, "peer")
            log.info("peer removed: %s", peer)
        for peer in upserted:
            result.count(result.added, "peer")
            if peer.public_key in actual:
                log.info("peer changed: %s (was %s)", peer, actual[peer.public_key])
            elif peer in self._desired:
                result.count(result.repaired, "peer")
                log.info("peer restored: %s", peer)
            else:
                log.info("peer added: %s", peer)

    async def inspect(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease]
    ) -> dict[IPv4Network, list[str]]:
        """For each peer, its WireGuard peer when the device lacks it (or has it otherwise)."""
        assert self.device is not None
        desired, _ = plan(lease, peers, self.opts.listen_port, self.opts.keepalive, self._psk)
        async with self._lock:
            have = set((await self.device.get()).peers.values())
        out: dict[IPv4Network, list[str]] = {subnet: [] for subnet in peers}
        for peer in desired - have:
            for net in peer.allowed_ips:
                if net in out:
                    out[net].append(str(peer))
        return out

    async def close(self) -> None:
        """Release sockets; the device (and wireguard-go) keep carrying traffic."""
        self._view.invalidate()
        if self.device is not None:
            await self.device.close()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
