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
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from flanneld.core.config import ConfigError, NetworkConfig, bool_field, ci_get, int_field
from flanneld.core.interfaces import NO_ADDRESS
from flanneld.core.lease import Lease, LeaseAttrs

from . import netlink
from .base import BackendContext, BackendError, skip_reason
from .kernel import KernelBackend
from .plancache import Planner
from .reconcile import Fdb, Neigh, Route
from .registry import register
from .rtnl import Known, Rtnl

log = logging.getLogger(__name__)

TYPE = "vxlan"
DEFAULT_PORT = 8472  # the kernel's default, which the reference's Port 0 means
ENCAP_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
ENCAP_OVERHEAD6 = 70  # outer Ethernet 14 + IPv6 40 + UDP 8 + VXLAN 8
MIN_IPV4_MTU = 68
MIN_IPV6_MTU = 1280  # below it the kernel runs no IPv6 on a device
MAX_VNI = 9_999_999  # "flannel." + 7 digits fills the kernel's 15-character interface name
MAX_VNI6 = 9_999  # "flannel-v6." + 4 digits does
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

Entry = Route | Neigh | Fdb
Address = IPv4Address | IPv6Address


@dataclass(frozen=True)
class VxlanOptions:
    """The Backend object of the network config, validated; `mtu` None: the underlay's."""

    vni: int = 1
    port: int = DEFAULT_PORT
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    mtu: int | None = None

    @property
    def device(self) -> str:
        return f"flannel.{self.vni}"


def parse_options(options: Mapping[str, Any]) -> VxlanOptions:
    """Read VNI, Port, GBP, Learning, DirectRouting and MTU (keys in any case) with defaults.

    Port 0 and MTU 0 mean the defaults, as in the reference.
    """
    obj, at = dict(options), "Backend."
    vni = int_field(obj, "VNI", 0, MAX_VNI, at)
    mtu = int_field(obj, "MTU", 0, 65535, at)
    if mtu and mtu - ENCAP_OVERHEAD < MIN_IPV4_MTU:
        raise ConfigError(
            f"network config: Backend.MTU {mtu} leaves less than {MIN_IPV4_MTU} bytes after "
            f"{ENCAP_OVERHEAD} bytes of VXLAN overhead; use 0 (the interface's) or at least "
            f"{MIN_IPV4_MTU + ENCAP_OVERHEAD}"
        )
    return VxlanOptions(
        vni=1 if vni is None else vni,
        port=int_field(obj, "Port", 0, 65535, at) or DEFAULT_PORT,
        gbp=bool_field(obj, "GBP", False, at),
        learning=bool_field(obj, "Learning", False, at),
        direct_routing=bool_field(obj, "DirectRouting", False, at),
        mtu=mtu or None,
    )


def vtep_mac(public_ip: Address, vni: int) -> str:
    """The node's VTEP MAC: derived from its identity (its PublicIP for `flannel.<VNI>`, its
    PublicIPv6 for `flannel-v6.<VNI>`), so it survives restarts and device re-creation; locally
    administered and unicast, as the reference's random ones are."""
    tag = "flannel-vtep" if public_ip.version == 4 else "flannel-vtep-v6"
    digest = hashlib.sha256(f"{tag}/{public_ip}/{vni}".encode()).digest()
    octets = [(digest[0] & 0xFC) | 0x02, *digest[1:6]]
    return ":".join(f"{b:02x}" for b in octets)


def _data_mac(data: Any) -> str | None:
    mac = ci_get(data, "VtepMAC") if isinstance(data, dict) else None
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(low := mac.lower()):
        return None
    mac = low if low != mac else mac  # the record's own string when it is lower case
    return mac if netlink.is_unicast(mac) else None


def peer_mac(lease: Lease) -> str | None:
    """The VtepMAC a lease's BackendData announces, in lower case; None when it has no valid one."""
    return _data_mac(lease.attrs.backend_data)


def peer_mac6(lease: Lease) -> str | None:
    """The VtepMAC of a lease's BackendV6Data (its `flannel-v6` device), likewise."""
    return _data_mac(lease.attrs.backend_v6_data)


def claims(lease: Lease) -> tuple[tuple[int, str], ...]:
    """What of a lease's only one peer can have (`plancache`): its VtepMAC per family."""
    macs = ((4, peer_mac(lease)), (6, peer_mac6(lease)))
    return tuple((version, mac) for version, mac in macs if mac is not None)


@dataclass
class _Planner:
    """The entries planned so far, and per address family which VtepMAC is whose."""

    direct: Set[Address] | None
    ext_index: int
    entries: set[Entry] = field(default_factory=set)
    owners: dict[int, dict[str, str]] = field(default_factory=lambda: {4: {}, 6: {}})

    def peer(
        self, owner: str, net: IPv4Network | IPv6Network, public: Address, mac: str | None,
        data: tuple[str, Any], vx_index: int,
    ) -> str:  # fmt: skip
        """Plan one peer's entries for `net` (one family); why not ("" when planned). `data`:
        (the field's name, its value), spelled out only in a warning."""
        if mac is None:
            return (
                f"its {data[0]} {json.dumps(data[1])} has no valid unicast VtepMAC; "
                "restart the agent on that node to rewrite its lease"
            )
        if self.direct and public in self.direct:
            self.entries.add(Route(net, public, self.ext_index))
            return ""
        owners = self.owners[net.version]
        if mac in owners:
            return f"its VtepMAC {mac} is also {owners[mac]}; every node needs its own MAC"
        owners[mac] = owner
        gateway = net.network_address
        self.entries.add(Neigh(vx_index, gateway, mac))
        self.entries.add(Fdb(vx_index, mac, public))
        self.entries.add(Route(net, gateway, vx_index, onlink=True))
        return ""


def _not6(local: Lease, peer: Lease) -> str:
    """Why a peer's IPv6 half cannot be planned before its VtepMAC is looked at ("" if not)."""
    if peer.ipv6_subnet is None:
        return "its lease has no IPv6 subnet; restart the agent on that node with EnableIPv6"
    if peer.attrs.public_ipv6 is None:
        return "its lease names no PublicIPv6; restart the agent on that node to rewrite its lease"
    if peer.ipv6_subnet == local.ipv6_subnet:
        return "it is our IPv6 subnet"
    if peer.attrs.public_ipv6 == local.attrs.public_ipv6:
        return "its PublicIPv6 is ours; two nodes must not share a public address"
    return ""


def plan(
    local: Lease,
    peers: Mapping[IPv4Network, Lease],
    vx_index: int,
    direct: Set[Address] | None,
    ext_index: int,
    vx6_index: int = 0,
) -> tuple[set[Entry], list[str]]:
    """The entries to program for `peers`, and one warning per peer skipped (per family).

    A peer gets a permanent ARP entry (its subnet's network address → VtepMAC), an FDB entry
    (VtepMAC → PublicIP) and an onlink route via that address on the VXLAN device; a peer whose
    PublicIP is in `direct` (DirectRouting on, peer on-link) gets only a route via its PublicIP
    on the external interface. Skipped: our own subnet or PublicIP, another backend type, a
    missing or invalid VtepMAC, a VtepMAC already taken (ours, or an older lease's: the one
    created first keeps it, so a record copying a peer's MAC cannot take its traffic).

    Dual-stack (`vx6_index`, the IPv6 device, given and our lease has an IPv6 subnet): the
    same for each peer's IPv6 subnet with its PublicIPv6 and BackendV6Data's VtepMAC on the
    IPv6 device. Each family is planned on its own (a peer may get one and a warning for the
    other), and IPv6 MACs are owned apart from IPv4 ones (a reference node may use one twice).
    IPv6-only (`vx_index` 0, or our lease without IPv4): the IPv6 entries alone.
    """
    p, warnings = _Planner(direct, ext_index), []
    for version, mac in ((4, peer_mac(local)), (6, peer_mac6(local))):
        if mac:
            p.owners[version][mac] = "ours"
    dual = bool(vx6_index) and local.ipv6_subnet is not None
    for subnet, peer in sorted(peers.items(), key=lambda kv: (kv[1].create_revision, kv[0])):
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            warnings.append(why)
            continue
        owner, attrs = f"that of {subnet}", peer.attrs
        data = ("BackendData", attrs.backend_data)
        four = bool(vx_index) and local.has_ipv4
        if four and (why := p.peer(owner, subnet, attrs.public_ip, peer_mac(peer), data, vx_index)):
            warnings.append(f"skipping peer lease {subnet} (PublicIP {attrs.public_ip}): {why}")
        if not dual:
            continue
        data6 = ("BackendV6Data", attrs.backend_v6_data)
        why = _not6(local, peer) or p.peer(
            owner, peer.ipv6_subnet, attrs.public_ipv6, peer_mac6(peer), data6, vx6_index
        )
        if why:
            skip = f"skipping the IPv6 subnet of peer lease {subnet}"
            warnings.append(f"{skip} (PublicIPv6 {attrs.public_ipv6 or 'none'}): {why}")
    return p.entries, warnings


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
            if name in wanted:
                continue
            try:
                [link] = await ipr.link("get", ifname=name)
            except NetlinkError as err:
                if err.code != errno.ENODEV:
                    raise
                continue
            if link.get(("linkinfo", "kind")) == "vxlan":
                await ipr.link("del", index=link["index"])
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
