"""The vxlan backend: a kernel VXLAN device `flannel.<VNI>` with a stable VTEP MAC, and per peer
a permanent ARP entry, an FDB entry and an onlink route through it (with DirectRouting, a plain
route to a peer on the same L2 segment). The pure `plan` gives the entries; `reconcile` applies.

Dual-stack (EnableIPv6), as the reference: a second device `flannel-v6.<VNI>` over the IPv6
underlay with its own stable MAC (the lease's `BackendV6Data`) and `<IPv6 subnet>/128`, and
per peer the same three entries for its IPv6 subnet (NDP, FDB to its PublicIPv6, route). Its
MTU is the base less 70 (outer Ethernet 14 + IPv6 40 + UDP 8 + VXLAN 8; the reference's 50 is
too few, and the kernel refuses more than base − 70). FLANNEL_MTU is one number for both
families, so in dual-stack `mtu` is base − 70: container packets fit either device.
`flannel.<VNI>` keeps base − 50 either way.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping, Set
from dataclasses import dataclass, replace
from ipaddress import IPv4Network
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from flanneld.core.config import ConfigError, NetworkConfig
from flanneld.core.interfaces import NO_ADDRESS
from flanneld.core.lease import Lease, LeaseAttrs

from . import netlink
from .base import BackendContext, BackendError
from .kernel import KernelBackend
from .plancache import Planner
from .reconcile import Neigh, Route
from .registry import register
from .rtnl import Known, Rtnl
from .vxlanplan import (
    ENCAP_OVERHEAD,
    ENCAP_OVERHEAD6,
    MAX_VNI6,
    MIN_IPV4_MTU,
    MIN_IPV6_MTU,
    TYPE,
    Address,
    Entry,
    VxlanOptions,
    claims,
    parse_options,
    plan,
    vtep_mac,
)

log = logging.getLogger(__name__)


def mismatches(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """The attributes of an existing device that differ from the wanted ones, as "key have
    (want x)"; empty when the device can be reused."""
    return [
        f"{key} {have.get(key)} (want {value})"
        for key, value in want.items()
        if have.get(key) != value
    ]


def _device_attrs(link: Any) -> dict[str, Any]:
    """What `mismatches` compares, read from a link message."""
    data = link.get(("linkinfo", "data"))
    attrs: dict[str, Any] = {"kind": link.get(("linkinfo", "kind"))}
    if attrs["kind"] == "vxlan" and data is not None:
        keys = ("id", "local", "local6", "link", "port", "group", "group6")
        attrs.update({f"vxlan_{key}": data.get(f"vxlan_{key}") for key in keys})
        for flag in ("vxlan_learning", "vxlan_gbp"):
            attrs[flag] = bool(data.get(flag))
    return attrs


@dataclass
class _Vtep:
    """One of the backend's devices: `flannel.<VNI>` over IPv4, `flannel-v6.<VNI>` over IPv6."""

    version: int
    vni: int
    local: str  # the underlay address it sends from
    mac: str
    mtu: int
    index: int = 0  # its ifindex once it exists

    @property
    def name(self) -> str:
        return f"flannel.{self.vni}" if self.version == 4 else f"flannel-v6.{self.vni}"

    def __str__(self) -> str:
        return f"{self.name} (VNI {self.vni}, MAC {self.mac}, MTU {self.mtu})"


_CREATE_HINTS = {
    errno.EEXIST: "another VXLAN device may use the same VNI and port; delete it or change VNI",
    errno.EOPNOTSUPP: "the kernel lacks VXLAN support; load it with `modprobe vxlan`",
    errno.EPERM: "run the agent as root or with CAP_NET_ADMIN",
    errno.EAFNOSUPPORT: "IPv6 is disabled in this kernel; enable it or remove EnableIPv6",
}


@register(TYPE)
class VxlanBackend(KernelBackend):
    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> VxlanOptions:
        return parse_options(options)

    @classmethod
    def check_network(cls, config: NetworkConfig) -> None:
        vni = parse_options(config.backend).vni
        if config.ipv6 is not None and vni > MAX_VNI6:
            raise ConfigError(
                f"network config: Backend.VNI {vni} makes the IPv6 device name flannel-v6.{vni} "
                f"longer than the kernel's 15 characters; with EnableIPv6 use at most {MAX_VNI6}"
            )

    @classmethod
    def owned_devices(cls) -> tuple[tuple[str, str], ...]:
        return (("vxlan", r"flannel(-v6)?\.\d+"),)  # the IPv4 and the IPv6 device

    def __init__(self, ctx: BackendContext, netns: str | None = None) -> None:
        super().__init__(ctx, netns)
        self._opts = VxlanOptions()  # replaced by the validated options in prepare()
        self._v4: _Vtep | None = None  # set up in prepare(); None in an IPv6-only network
        self._v6: _Vtep | None = None  # dual-stack and IPv6-only only
        self._busy = ""  # the device being set up, for prepare()'s error
        # DirectRouting: PublicIP(v6) → reached without a gateway through the external
        # interface; asked of the kernel on full passes and for new addresses only
        self._on_link_known: dict[Address, bool] = {}

    @property
    def _base_mtu(self) -> int:
        return self._opts.mtu or self.ctx.ext.mtu

    @property
    def mtu(self) -> int:
        """FLANNEL_MTU: what fits the IPv4 device, and with IPv6 the IPv6 one too."""
        six = self.ctx.config.ipv6 is not None
        return self._base_mtu - (ENCAP_OVERHEAD6 if six else ENCAP_OVERHEAD)

    def _vteps(self) -> list[_Vtep]:
        return [v for v in (self._v4, self._v6) if v is not None]

    async def prepare(self) -> LeaseAttrs:
        self._opts = parse_options(self.ctx.options)
        ext, vni, base = self.ctx.ext, self._opts.vni, self._base_mtu
        ipv4 = self.ctx.config.ipv4
        if ipv4 and base - ENCAP_OVERHEAD < MIN_IPV4_MTU:
            raise BackendError(
                f"the MTU of {ext.name} ({ext.mtu}) leaves less than "
                f"{MIN_IPV4_MTU} bytes after {ENCAP_OVERHEAD} bytes of VXLAN overhead; set "
                f"Backend.MTU to at least {MIN_IPV4_MTU + ENCAP_OVERHEAD}"
            )
        mac = vtep_mac(ext.ext_addr, vni)
        self._v4 = _Vtep(4, vni, str(ext.iface_addr), mac, base - ENCAP_OVERHEAD) if ipv4 else None
        self._v6 = self._prepare6() if self.ctx.config.ipv6 is not None else None
        async with self._lock:
            try:
                for vtep in await self._ensure_devices(self._socket()):
                    log.info("created device %s", vtep)
                await self._drop_unwanted(self._socket())
            except NetlinkError as err:
                await self.close()
                hint = _CREATE_HINTS.get(err.code, "see the kernel log")
                raise BackendError(
                    f"cannot set up VXLAN device {self._busy} ({os.strerror(err.code)}); {hint}"
                ) from None
        # an IPv6-only record has no BackendData and PublicIP 0.0.0.0, as the reference's
        attrs = (
            LeaseAttrs(ext.ext_addr, TYPE, {"VNI": vni, "VtepMAC": mac})
            if ipv4
            else LeaseAttrs(NO_ADDRESS, TYPE)
        )
        if self._v6 is None:
            return attrs
        v6_data = {"VNI": vni, "VtepMAC": self._v6.mac}
        return replace(attrs, public_ipv6=ext.ext_addr6, backend_v6_data=v6_data)

    def _prepare6(self) -> _Vtep:
        """The IPv6 device as the options and the interface allow it, or why not."""
        ext, vni, mtu = self.ctx.ext, self._opts.vni, self._base_mtu - ENCAP_OVERHEAD6
        self.check_network(self.ctx.config)
        if mtu < MIN_IPV6_MTU:
            raise BackendError(
                f"the MTU of {ext.name} ({ext.mtu}) leaves less than {MIN_IPV6_MTU} bytes (the "
                f"IPv6 minimum) after {ENCAP_OVERHEAD6} bytes of VXLAN-over-IPv6 overhead; set "
                f"Backend.MTU to at least {MIN_IPV6_MTU + ENCAP_OVERHEAD6}, or remove EnableIPv6"
            )
        if ext.iface_addr6 is None or ext.ext_addr6 is None:
            raise BackendError(
                f"{ext.name} has no global IPv6 address for the VXLAN device flannel-v6.{vni} "
                "to send from; give it one, or remove EnableIPv6"
            )
        mac6 = vtep_mac(ext.ext_addr6, vni)
        return _Vtep(6, vni, str(ext.iface_addr6), mac6, mtu)

    def _wanted(self, vtep: _Vtep) -> dict[str, Any]:
        o, six = self._opts, "6" if vtep.version == 6 else ""
        return {
            "kind": "vxlan",
            "vxlan_id": o.vni,
            f"vxlan_local{six}": vtep.local,
            "vxlan_link": self.ctx.ext.index,
            "vxlan_port": o.port,
            "vxlan_learning": o.learning,
            "vxlan_gbp": o.gbp,
            f"vxlan_group{six}": None,
        }

    async def _ensure_devices(self, ipr: AsyncIPRoute) -> list[_Vtep]:
        """Reuse each compatible device (fixing its MAC and MTU in place), else (re-)create it;
        the ones created. Incompatible devices go before any is created: one under the other
        name may hold its VNI and port. `_busy` names the device being worked on."""
        missing = [vtep for vtep in self._vteps() if not await self._reuse(ipr, vtep)]
        for vtep in missing:
            self._busy = vtep.name
            args = {k: v for k, v in self._wanted(vtep).items() if v is not None}
            args["vxlan_learning"] = int(self._opts.learning)
            if not self._opts.gbp:
                del args["vxlan_gbp"]  # a flag: present means on
            await ipr.link("add", ifname=vtep.name, address=vtep.mac, mtu=vtep.mtu, **args)
            [link] = await ipr.link("get", ifname=vtep.name)
            vtep.index = link["index"]
        return missing

    async def _drop_unwanted(self, ipr: AsyncIPRoute) -> None:
        """Delete our device of a family the network no longer has (IPv6 turned off, or
        IPv4 in an IPv6-only network): its entries go with it."""
        wanted = {vtep.name for vtep in self._vteps()}
        for version in (4, 6):
            name = _Vtep(version, self._opts.vni, "", "", 0).name
            if name not in wanted and await netlink.delete_link(ipr, name, ("vxlan",)):
                log.warning(
                    "deleted device %s: the network config has no IPv%d any more", name, version
                )

    async def _reuse(self, ipr: AsyncIPRoute, vtep: _Vtep) -> bool:
        """True when the device is there and compatible (then fixed in place); an incompatible
        one is deleted."""
        self._busy = vtep.name
        try:
            [link] = await ipr.link("get", ifname=vtep.name)
        except NetlinkError as err:
            if err.code != errno.ENODEV:
                raise
            return False
        differ = mismatches(_device_attrs(link), self._wanted(vtep))
        if not differ:
            vtep.index = link["index"]
            await self._fix_in_place(ipr, link, vtep)
            return True
        log.warning("device %s has %s: deleting and re-creating it", vtep.name, ", ".join(differ))
        await ipr.link("del", index=link["index"])
        return False

    async def _fix_in_place(self, ipr: AsyncIPRoute, link: Any, vtep: _Vtep) -> None:
        if (was := link.get("address")) != vtep.mac:
            await ipr.link("set", index=vtep.index, address=vtep.mac)
            log.warning("device %s: MAC set to %s (was %s)", vtep.name, vtep.mac, was)
        if link.get("mtu") != vtep.mtu:
            await ipr.link("set", index=vtep.index, mtu=vtep.mtu)
            log.info("device %s: MTU set to %d (was %s)", vtep.name, vtep.mtu, link.get("mtu"))

    async def _configure_device(self, ipr: AsyncIPRoute, lease: Lease) -> None:
        """`<subnet network address>/32` the only flannel address on the device (and on the
        IPv6 one `<IPv6 subnet network address>/128`), devices up."""
        network = self.ctx.config.network
        if self._v4 is not None and network is not None and lease.has_ipv4:
            [link] = await ipr.link("get", index=self._v4.index)
            await netlink.own_address_up(ipr, link, lease.subnet, network)
        v6, range6 = self._v6, self.ctx.config.ipv6
        if v6 is not None and range6 is not None and lease.ipv6_subnet is not None:
            [link] = await ipr.link("get", index=v6.index)
            await netlink.own_address_up(ipr, link, lease.ipv6_subnet, range6.network)

    async def _heal_device(self, ipr: AsyncIPRoute, lease: Lease) -> None:
        """The devices present, compatible, addressed and up, whatever happened to them."""
        for vtep in await self._ensure_devices(ipr):
            self._view.invalidate()  # the old device took its entries along
            log.warning("device %s re-created; replaying every peer", vtep)
        await self._configure_device(ipr, lease)

    async def configure(self, lease: Lease) -> None:
        async with self._lock:
            try:
                await self._heal_device(self._socket(), lease)
            except Exception:
                await self.close()
                raise

    async def _on_link(self, ipr: AsyncIPRoute, addrs: Set[Address], fresh: bool) -> set[Address]:
        """The addresses the kernel reaches without a gateway through the external interface:
        one `route get` per address on a `fresh` (full) pass, else only for new addresses."""
        known = {} if fresh else {a: v for a, v in self._on_link_known.items() if a in addrs}
        for addr in addrs - known.keys():
            try:
                routes = await ipr.route("get", dst=str(addr))
            except NetlinkError:
                known[addr] = False  # unreachable: not direct
                continue
            known[addr] = (
                len(routes) == 1
                and routes[0].get("gateway") is None
                and routes[0].get("oif") == self.ctx.ext.index
            )
        self._on_link_known = known
        return {addr for addr, direct in known.items() if direct}

    async def intact(self) -> bool:
        """The devices are still there and up (one netlink request each): setting one down
        flushes the routes through it."""
        async with self._lock:
            try:
                links = [await self._socket().link("get", index=v.index) for v in self._vteps()]
            except NetlinkError:
                return False
            except Exception:
                await self.close()
                raise
        return all(
            link.get_attr("IFLA_IFNAME") == vtep.name and link["flags"] & IFF_UP
            for [link], vtep in zip(links, self._vteps(), strict=True)
        )

    async def _before_pass(self, ipr: AsyncIPRoute, lease: Lease) -> None:
        await self._heal_device(ipr, lease)

    async def _planner(
        self, ipr: AsyncIPRoute, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool
    ) -> Planner:
        direct: Set[Address] = set()
        if self._opts.direct_routing:
            ips: set[Address | None] = {p.attrs.public_ip for p in peers.values()}
            if self._v6 is not None:
                ips |= {p.attrs.public_ipv6 for p in peers.values()}
            ours = {None, lease.attrs.public_ip, lease.attrs.public_ipv6}
            direct = await self._on_link(ipr, {ip for ip in ips if ip not in ours}, full)
        v6 = self._v6.index if self._v6 is not None else 0
        v4 = self._v4.index if self._v4 is not None else 0
        ext = self.ctx.ext.index
        return Planner(
            (lease, v4, v6, ext, self._opts.direct_routing),
            lambda some: plan(lease, some, v4, direct or None, ext, v6),  # type: ignore[arg-type]
            claims,
            # a peer is re-planned when its PublicIP(v6) turns on-link or stops being so
            lambda p: direct and (p.attrs.public_ip in direct, p.attrs.public_ipv6 in direct),
        )

    async def _dump(self, rtnl: Rtnl, known: Known) -> set[Entry]:
        dumped: set[Entry] = set()
        for vtep in self._vteps():
            dumped |= await rtnl.dump_neighs(vtep.index, vtep.version, known)
            dumped |= await rtnl.dump_fdb(vtep.index, known)
        for version in (4, 6):  # ours on any device: others are stale
            dumped |= await rtnl.dump_routes(version, known=known)
        return dumped

    def _describe(self, entry: Entry) -> str:
        """An entry as iproute2 would print it, with device names."""
        names = {v.index: v.name for v in self._vteps()}
        names[self.ctx.ext.index] = self.ctx.ext.name
        if isinstance(entry, Route):
            via = f" via {entry.gateway}" if entry.gateway else ""
            dev = names.get(entry.oif, f"#{entry.oif}")
            return f"{entry.dst}{via} dev {dev}{' onlink' if entry.onlink else ''}"
        dev = names.get(entry.ifindex, f"#{entry.ifindex}")
        if isinstance(entry, Neigh):
            return f"{entry.dst} lladdr {entry.lladdr} dev {dev}"
        return f"{entry.lladdr} dst {entry.dst} dev {dev}"
