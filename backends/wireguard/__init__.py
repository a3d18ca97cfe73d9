"""The wireguard backend: container traffic between nodes encrypted by WireGuard, on the
device `flannel-wg` (MTU = underlay − 80), as the reference's backend of that name; in a
dual-stack network (the reference's "separate" mode) also `flannel-wg-v6` for IPv6, or in its
single-device modes ("auto", "ipv4", "ipv6") both families on `flannel-wg`.

A device holds `<subnet network address>/32` (`/128`) and the route for the whole cluster
network of its family (proto 155, as the reference routes the Network onto it); each peer
lease is one WireGuard peer per family (its record's `PublicKey`, endpoint
`PublicIP:ListenPort` or `[PublicIPv6]:ListenPortV6`, allowed-ips its subnet), so the device's
own routing picks the peer. The kernel's WireGuard is used where the kernel has it
(`kerneldev`), else a wireguard-go child per device (`userspace`): one log line says which.
The pure parts: `options`, `keys` (X25519), `uapi` (the configuration as data and as UAPI
text) and `plan`; `keyfile` keeps the private key, one for both devices (as the reference).

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
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from flanneld.core.config import ConfigError, NetworkConfig
from flanneld.core.interfaces import NO_ADDRESS
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
from .plan import TYPE, plan, plan_single
from .uapi import NO_KEY, PeerConfig, UapiError
from .userspace import UserspaceDevice

log = logging.getLogger(__name__)

DEVICE, DEVICE6 = "flannel-wg", "flannel-wg-v6"
ENCAP_OVERHEAD = 80  # outer IPv6 40 + UDP 8 + WireGuard 32, as the reference counts
MIN_MTU, MIN_IPV6_MTU = 68, 1280

Device = KernelDevice | UserspaceDevice


@dataclass
class _Family:
    """One device and what the backend knows of it: `flannel-wg` (IPv4; in the single-device
    modes every family of the network), `flannel-wg-v6` (IPv6 in "separate" mode)."""

    versions: tuple[int, ...]
    name: str
    port: int
    device: Device
    view: KernelView = field(default_factory=KernelView)  # its peers: read on full passes
    desired: set[PeerConfig] = field(default_factory=set)  # the last plan
    routes: set[Route] = field(default_factory=set)


@register(TYPE)
class WireguardBackend(Backend):
    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> WireguardOptions:
        return parse_options(options)

    @classmethod
    def check_network(cls, config: NetworkConfig) -> None:
        mode = parse_options(config.backend).mode
        if (mode == "ipv4" and not config.ipv4) or (mode == "ipv6" and config.ipv6 is None):
            family = "IPv4" if mode == "ipv4" else "IPv6"
            raise ConfigError(
                f'network config: Backend.Mode "{mode}" sends to peers over {family}, which this '
                f'network does not have; use "auto" or "separate"'
            )

    @classmethod
    def owned_devices(cls) -> tuple[tuple[str, str], ...]:
        # the kernel's devices, or wireguard-go's TUNs (deleting one ends its wireguard-go)
        return (("wireguard", r"flannel-wg(-v6)?"), ("tun", r"flannel-wg(-v6)?"))

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.opts = WireguardOptions()  # the validated ones from prepare() on
        self.families: list[_Family] = []
        self._private = NO_KEY
        self._psk: bytes | None = None
        self._ipr: AsyncIPRoute | None = None
        self._rtnl: Rtnl | None = None
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        self.skipped = 0  # peer leases (or IPv6 halves) the last pass could not use

    @property
    def public_key(self) -> bytes:
        return public_key(self._private)

    @property
    def mtu(self) -> int:
        return self.ctx.ext.mtu - ENCAP_OVERHEAD

    def stats(self) -> dict[str, int]:
        out = {"peers_skipped": self.skipped}
        starts = [f.device.starts for f in self.families if isinstance(f.device, UserspaceDevice)]
        if starts:
            out["wireguard_go_starts"] = sum(starts)
        return out

    def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            self._ipr = netlink.open_ipr()
        return self._ipr

    # -- start --------------------------------------------------------------------------------
    def _check(self) -> None:
        ext, six = self.ctx.ext, self.ctx.config.ipv6 is not None
        self.check_network(self.ctx.config)
        least = MIN_IPV6_MTU if six else MIN_MTU
        if self.mtu < least:
            raise BackendError(
                f"the MTU of {ext.name} ({ext.mtu}) leaves less than {least} bytes after "
                f"{ENCAP_OVERHEAD} bytes of WireGuard overhead; use a larger MTU"
            )
        if six and (ext.iface_addr6 is None or ext.ext_addr6 is None):
            raise BackendError(
                f"{ext.name} has no global IPv6 address for {DEVICE6} to send from; give it "
                "one, or remove EnableIPv6"
            )

    async def prepare(self) -> LeaseAttrs:
        self.opts = parse_options(self.ctx.options)
        self._check()
        path = key_path(os.environ, self.ctx.state_dir)
        self._private, created = load_or_create(path)
        self._psk = load_psk(os.environ) or self.opts.psk
        pub = encode_key(self.public_key)
        log.info("wireguard: public key %s (%s %s)", pub, "new key in" if created else "key", path)
        config = self.ctx.config
        wanted: list[tuple[tuple[int, ...], str, int]] = []
        if self.single:  # every family on flannel-wg
            versions = (4,) * config.ipv4 + (6,) * (config.ipv6 is not None)
            wanted.append((versions, DEVICE, self.opts.listen_port))
        else:
            wanted += [((4,), DEVICE, self.opts.listen_port)] if config.ipv4 else []
            if config.ipv6 is not None:
                wanted.append(((6,), DEVICE6, self.opts.listen_port6))
        async with self._lock:
            busy = DEVICE
            try:
                await self._drop_unwanted({name for _, name, _ in wanted})
                for versions, name, port in wanted:
                    busy = name
                    family = _Family(versions, name, port, await self._choose(name))
                    self.families.append(family)
                    await family.device.ensure()
                    await self._settings(family, True)
            except (NetlinkError, UapiError, OSError) as e:
                await self.close()
                raise BackendError(f"cannot set up WireGuard device {busy}: {e}") from None
        # an IPv6-only record has no BackendData and PublicIP 0.0.0.0, as the reference's
        if config.ipv4:
            attrs = LeaseAttrs(self.ctx.ext.ext_addr, TYPE, {"PublicKey": pub})
        else:
            attrs = LeaseAttrs(NO_ADDRESS, TYPE)
        if config.ipv6 is None:
            return attrs
        return replace(
            attrs, public_ipv6=self.ctx.ext.ext_addr6, backend_v6_data={"PublicKey": pub}
        )

    async def _drop_unwanted(self, wanted: set[str]) -> None:
        """Delete a device of a family the network no longer has (IPv6 turned off, IPv4 in an
        IPv6-only network): deleting wireguard-go's TUN ends that wireguard-go too."""
        ipr = self._socket()
        for name in sorted({DEVICE, DEVICE6} - wanted):
            if await netlink.delete_link(ipr, name, ("wireguard", "tun")):
                log.warning("device %s deleted: the network no longer has its family", name)

    async def _choose(self, name: str) -> Device:
        """The kernel's device where the kernel has WireGuard, else wireguard-go; one line.
        A wireguard-go left serving this state directory's socket is kept (adopted)."""
        userspace = UserspaceDevice(name, self.ctx.state_dir / "wireguard")
        if userspace.socket_path.exists() and await userspace.answers():
            log.info("wireguard: device %s: userspace, %s still serving it", name, userspace)
            return userspace
        if await KernelDevice.create(self._socket(), name):
            log.info("wireguard: device %s: the kernel's WireGuard", name)
            return KernelDevice(name, self._socket)
        if why := UserspaceDevice.available():
            raise BackendError(f"the kernel has no WireGuard and {why}")
        log.info(
            "wireguard: device %s: the kernel has no WireGuard; userspace wireguard-go, "
            "configured on %s",
            name,
            userspace.socket_path,
        )
        return userspace

    async def _settings(self, family: _Family, fresh: bool) -> None:
        """The device's private key and listen port as they must be (read back when `fresh`)."""
        device = family.device
        state = await device.get() if fresh else None
        stale = state is None or state.private_key != self._private
        key = self._private if stale else None
        port = None if state is not None and state.listen_port == family.port else family.port
        if key is None and port is None:
            return
        try:
            await device.set(private_key=key, listen_port=port)
        except (UapiError, NetlinkError) as e:
            code = getattr(e, "errno", None) or getattr(e, "code", 0)
            if abs(code or 0) == errno.EADDRINUSE:
                option = "ListenPort" if family.name == DEVICE else "ListenPortV6"
                raise BackendError(
                    f"UDP port {family.port} is taken on this node; stop what uses it or set "
                    f"Backend.{option}"
                ) from None
            raise
        if state is not None and key is not None and state.private_key != NO_KEY:
            log.warning("wireguard: device %s had another private key; set to ours", family.name)

    @property
    def single(self) -> bool:
        """One device for both families (Mode "auto", "ipv4", "ipv6" with EnableIPv6); in an
        IPv4-only network every mode is one device, as "separate" is."""
        return self.opts.mode != "separate" and self.ctx.config.ipv6 is not None

    def _halves(
        self, family: _Family, lease: Lease
    ) -> list[tuple[IPv4Network | IPv6Network | None, IPv4Network | IPv6Network]]:
        """(the lease's subnet, the cluster network) of each IP version the device carries."""
        config, out = self.ctx.config, []
        for version in family.versions:
            network = config.network if version == 4 else config.ipv6 and config.ipv6.network
            assert network is not None  # a device carries only a family the network has
            out.append((lease.subnet if version == 4 else lease.ipv6_subnet, network))
        return out

    async def _configure_link(self, family: _Family, lease: Lease) -> int:
        """MTU, `<subnet network address>/32` (/128) as its only flannel address, up; its
        index."""
        ipr = self._socket()
        [link] = await ipr.link("get", ifname=family.name)
        index = link["index"]
        if link.get("mtu") != self.mtu:
            await ipr.link("set", index=index, mtu=self.mtu)
            log.info("device %s: MTU %d", family.name, self.mtu)
        for subnet, network in self._halves(family, lease):
            if subnet is not None:
                await netlink.own_address_up(ipr, link, subnet, network)
        return index

    async def _sync_route(
        self, family: _Family, lease: Lease, index: int, result: ReconcileResult
    ) -> None:
        """The route of each cluster network the device carries, via it; any other proto-155
        route of those families is stale."""
        if self._rtnl is None:
            self._rtnl = Rtnl()
        halves = self._halves(family, lease)
        desired = {Route(dst=network, gateway=None, oif=index) for _, network in halves}
        actual = set()
        for version in family.versions:
            actual |= await self._rtnl.dump_routes(version=version)
        done = await netlink.apply(self._rtnl, diff(desired, actual), result)
        done.report(actual, family.routes, result, lambda r: f"{r.dst} dev {family.name}")
        family.routes = desired

    async def configure(self, lease: Lease) -> None:
        async with self._lock:
            try:
                for family in self.families:
                    index = await self._configure_link(family, lease)
                    await self._sync_route(family, lease, index, ReconcileResult())
            except Exception:
                await self.close()
                raise

    # -- steady state ---------------------------------------------------------------------------
    async def intact(self) -> bool:
        """Every wireguard-go alive (or, adopted, answering), every device there and up."""
        async with self._lock:
            for family in self.families:
                device = family.device
                if isinstance(device, UserspaceDevice):
                    alive = device.child_alive()
                    if alive is False or (alive is None and not await device.answers()):
                        return False
                try:
                    [link] = await self._socket().link("get", ifname=family.name)
                except NetlinkError:
                    return False
                except Exception:
                    await self.close()
                    raise
                if not link["flags"] & IFF_UP:
                    return False
        return True

    def _plan(
        self, family: _Family, lease: Lease, peers: Mapping[IPv4Network, Lease]
    ) -> tuple[set[PeerConfig], list[str]]:
        o, ext = self.opts, self.ctx.ext
        if self.single:
            return plan_single(
                lease,
                peers,
                family.port,
                o.mode,
                family.versions,
                o.keepalive,
                self._psk,
                have4=ext.ext_addr != NO_ADDRESS,
                own6=ext.ext_addr6,
            )
        return plan(lease, peers, family.port, o.keepalive, self._psk, family.versions[0])

    async def reconcile(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool = True
    ) -> ReconcileResult:
        result, warnings = ReconcileResult(), []
        async with self._lock:
            try:
                for family in self.families:
                    warnings += await self._pass(family, lease, peers, full, result)
            except Exception:
                await self.close()  # the next pass starts from a fresh socket and a fresh read
                raise
        for warning in warnings:
            if warning not in self._warned:
                log.warning("%s", warning)
        self._warned = set(warnings)
        self.skipped = len(warnings)
        return result

    async def _pass(
        self,
        family: _Family,
        lease: Lease,
        peers: Mapping[IPv4Network, Lease],
        full: bool,
        result: ReconcileResult,
    ) -> list[str]:
        """One family's pass; its warnings."""
        device = family.device
        if await device.ensure(cheap=not full):
            log.warning("wireguard: device %s made again; replaying every peer", family.name)
            family.view.invalidate()
            await self._settings(family, False)
            full = True
        desired, warnings = self._plan(family, lease, peers)
        if full:
            await self._settings(family, True)
            index = await self._configure_link(family, lease)
            await self._sync_route(family, lease, index, result)
        if full or not family.view.known:
            family.view.refresh((await device.get()).peers.values())
        actual = {p.public_key: p for p in family.view.entries()}
        change = diff(desired, actual.values())
        upserts = sorted(change.upsert, key=lambda p: p.public_key)
        if change:
            await device.set(remove=sorted(p.public_key for p in change.remove), upsert=upserts)
            family.view.applied(upserts, change.remove)
        self._report(family, actual, change.remove, upserts, result)
        family.desired = desired
        return warnings

    def _report(
        self,
        family: _Family,
        actual: dict[bytes, PeerConfig],
        removed: frozenset[PeerConfig],
        upserted: list[PeerConfig],
        result: ReconcileResult,
    ) -> None:
        """One line per peer changed; a peer added again that the last plan had too was
        removed behind our back: counted as repaired."""
        dev = family.name
        for peer in removed:
            result.count(result.removed, "peer")
            log.info("%s: peer removed: %s", dev, peer)
        for peer in upserted:
            result.count(result.added, "peer")
            if peer.public_key in actual:
                log.info("%s: peer changed: %s (was %s)", dev, peer, actual[peer.public_key])
            elif peer in family.desired:
                result.count(result.repaired, "peer")
                log.info("%s: peer restored: %s", dev, peer)
            else:
                log.info("%s: peer added: %s", dev, peer)

    async def inspect(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease]
    ) -> dict[IPv4Network, list[str]]:
        """For each peer lease, its WireGuard peers a device lacks (or has otherwise)."""
        out: dict[IPv4Network, list[str]] = {subnet: [] for subnet in peers}
        owner = {p.ipv6_subnet: s for s, p in peers.items() if p.ipv6_subnet is not None}
        owner.update({s: s for s in peers})
        async with self._lock:
            for family in self.families:
                desired, _ = self._plan(family, lease, peers)
                have = set((await family.device.get()).peers.values())
                for peer in desired - have:
                    for net in peer.allowed_ips:
                        if net in owner:
                            out[owner[net]].append(f"{family.name}: {peer}")
        return out

    async def close(self) -> None:
        """Release sockets; the devices (and wireguard-go) keep carrying traffic."""
        for family in self.families:
            family.view.invalidate()
            await family.device.close()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
