"""The vxlan backend: a kernel VXLAN device `flannel.<VNI>` with a stable VTEP MAC, and per peer
a permanent ARP entry, an FDB entry and an onlink route through it (with DirectRouting, a plain
route to a peer on the same L2 segment). The pure `plan` gives the entries; `reconcile` applies.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from flanneld.core.config import ConfigError, bool_field, ci_get, int_field
from flanneld.core.lease import Lease, LeaseAttrs

from . import netlink
from .base import BackendContext, BackendError, skip_reason
from .kernel import KernelBackend
from .reconcile import Fdb, Neigh, Route
from .registry import register

log = logging.getLogger(__name__)

TYPE = "vxlan"
DEFAULT_PORT = 8472  # the kernel's default, which the reference's Port 0 means
ENCAP_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
MIN_IPV4_MTU = 68
MAX_VNI = 9_999_999  # "flannel." + 7 digits fills the kernel's 15-character interface name
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

Entry = Route | Neigh | Fdb


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


def vtep_mac(public_ip: IPv4Address, vni: int) -> str:
    """The node's VTEP MAC: derived from its identity, so it survives restarts and device
    re-creation; locally administered and unicast, as the reference's random ones are."""
    digest = hashlib.sha256(f"flannel-vtep/{public_ip}/{vni}".encode()).digest()
    octets = [(digest[0] & 0xFC) | 0x02, *digest[1:6]]
    return ":".join(f"{b:02x}" for b in octets)


def peer_mac(lease: Lease) -> str | None:
    """The VtepMAC a lease's BackendData announces, in lower case; None when it has no valid one."""
    data = lease.attrs.backend_data
    mac = ci_get(data, "VtepMAC") if isinstance(data, dict) else None
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.lower()):
        return None
    mac = mac.lower()
    return mac if netlink.is_unicast(mac) else None


def plan(
    local: Lease,
    peers: Mapping[IPv4Network, Lease],
    vx_index: int,
    direct: Set[IPv4Address] | None,
    ext_index: int,
) -> tuple[set[Entry], list[str]]:
    """The entries to program for `peers`, and one warning per peer skipped.

    A peer gets a permanent ARP entry (its subnet's network address → VtepMAC), an FDB entry
    (VtepMAC → PublicIP) and an onlink route via that address on the VXLAN device; a peer whose
    PublicIP is in `direct` (DirectRouting on, peer on-link) gets only a route via its PublicIP
    on the external interface. Skipped: our own subnet or PublicIP, another backend type, a
    missing or invalid VtepMAC, a VtepMAC already taken (ours, or an older lease's: the one
    created first keeps it, so a record copying a peer's MAC cannot take its traffic).
    """
    entries: set[Entry] = set()
    warnings: list[str] = []
    owners: dict[str, str] = {}
    own_mac = peer_mac(local)
    if own_mac:
        owners[own_mac] = "ours"
    for subnet, peer in sorted(peers.items(), key=lambda kv: (kv[1].create_revision, kv[0])):
        public_ip = peer.attrs.public_ip
        mac = peer_mac(peer)
        skip = f"skipping peer lease {subnet} (PublicIP {public_ip}): "
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            warnings.append(why)
        elif mac is None:
            data = json.dumps(peer.attrs.backend_data)
            warnings.append(
                skip + f"its BackendData {data} has no valid unicast VtepMAC; "
                "restart the agent on that node to rewrite its lease"
            )
        elif direct and public_ip in direct:
            entries.add(Route(subnet, public_ip, ext_index))
        elif mac in owners:
            warnings.append(
                skip + f"its VtepMAC {mac} is also {owners[mac]}; every node needs its own MAC"
            )
        else:
            owners[mac] = f"that of {subnet}"
            gateway = subnet.network_address
            entries.add(Neigh(vx_index, gateway, mac))
            entries.add(Fdb(vx_index, mac, public_ip))
            entries.add(Route(subnet, gateway, vx_index, onlink=True))
    return entries, warnings


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
        attrs.update(
            vxlan_id=data.get("vxlan_id"),
            vxlan_local=data.get("vxlan_local"),
            vxlan_link=data.get("vxlan_link"),
            vxlan_port=data.get("vxlan_port"),
            vxlan_learning=bool(data.get("vxlan_learning")),
            vxlan_gbp=bool(data.get("vxlan_gbp")),
            vxlan_group=data.get("vxlan_group"),
        )
    return attrs


_CREATE_HINTS = {
    errno.EEXIST: "another VXLAN device may use the same VNI and port; delete it or change VNI",
    errno.EOPNOTSUPP: "the kernel lacks VXLAN support; load it with `modprobe vxlan`",
    errno.EPERM: "run the agent as root or with CAP_NET_ADMIN",
}


@register(TYPE)
class VxlanBackend(KernelBackend):
    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> VxlanOptions:
        return parse_options(options)

    @classmethod
    def owned_devices(cls) -> tuple[tuple[str, str], ...]:
        return (("vxlan", r"flannel\.\d+"),)

    def __init__(self, ctx: BackendContext, netns: str | None = None) -> None:
        super().__init__(ctx, netns)
        self._opts = VxlanOptions()  # replaced by the validated options in prepare()
        self.mac = ""
        self.index = 0  # the device's ifindex
        # DirectRouting: PublicIP → reached without a gateway through the external interface;
        # asked of the kernel on full passes and for new addresses only
        self._on_link_known: dict[IPv4Address, bool] = {}

    @property
    def mtu(self) -> int:
        return (self._opts.mtu or self.ctx.ext.mtu) - ENCAP_OVERHEAD

    async def prepare(self) -> LeaseAttrs:
        self._opts = parse_options(self.ctx.options)
        if self.mtu < MIN_IPV4_MTU:
            raise BackendError(
                f"the MTU of {self.ctx.ext.name} ({self.ctx.ext.mtu}) leaves less than "
                f"{MIN_IPV4_MTU} bytes after {ENCAP_OVERHEAD} bytes of VXLAN overhead; set "
                f"Backend.MTU to at least {MIN_IPV4_MTU + ENCAP_OVERHEAD}"
            )
        self.mac = vtep_mac(self.ctx.ext.ext_addr, self._opts.vni)
        async with self._lock:
            try:
                if await self._ensure_device(self._socket()):
                    log.info("created device %s (%s)", self._opts.device, self._identity())
            except NetlinkError as err:
                await self.close()
                hint = _CREATE_HINTS.get(err.code, "see the kernel log")
                raise BackendError(
                    f"cannot set up VXLAN device {self._opts.device} "
                    f"({os.strerror(err.code)}); {hint}"
                ) from None
        return LeaseAttrs(self.ctx.ext.ext_addr, TYPE, {"VNI": self._opts.vni, "VtepMAC": self.mac})

    def _identity(self) -> str:
        return f"VNI {self._opts.vni}, MAC {self.mac}, MTU {self.mtu}"

    def _wanted(self) -> dict[str, Any]:
        o, ext = self._opts, self.ctx.ext
        return {
            "kind": "vxlan",
            "vxlan_id": o.vni,
            "vxlan_local": str(ext.iface_addr),
            "vxlan_link": ext.index,
            "vxlan_port": o.port,
            "vxlan_learning": o.learning,
            "vxlan_gbp": o.gbp,
            "vxlan_group": None,
        }

    async def _ensure_device(self, ipr: AsyncIPRoute) -> bool:
        """Reuse a compatible device (fixing its MAC and MTU in place), else (re-)create it;
        True when it was created."""
        name, want = self._opts.device, self._wanted()
        try:
            [link] = await ipr.link("get", ifname=name)
        except NetlinkError as err:
            if err.code != errno.ENODEV:
                raise
            link = None
        if link is not None:
            differ = mismatches(_device_attrs(link), want)
            if not differ:
                self.index = link["index"]
                await self._fix_in_place(ipr, link)
                return False
            log.warning("device %s has %s: deleting and re-creating it", name, ", ".join(differ))
            await ipr.link("del", index=link["index"])
        extra = {"vxlan_gbp": True} if self._opts.gbp else {}
        await ipr.link(
            "add",
            ifname=name,
            kind="vxlan",
            address=self.mac,
            mtu=self.mtu,
            vxlan_id=want["vxlan_id"],
            vxlan_local=want["vxlan_local"],
            vxlan_link=want["vxlan_link"],
            vxlan_port=want["vxlan_port"],
            vxlan_learning=int(self._opts.learning),
            **extra,
        )
        [link] = await ipr.link("get", ifname=name)
        self.index = link["index"]
        return True

    async def _fix_in_place(self, ipr: AsyncIPRoute, link: Any) -> None:
        name = self._opts.device
        if link.get("address") != self.mac:
            await ipr.link("set", index=self.index, address=self.mac)
            log.warning("device %s: MAC set to %s (was %s)", name, self.mac, link.get("address"))
        if link.get("mtu") != self.mtu:
            await ipr.link("set", index=self.index, mtu=self.mtu)
            log.info("device %s: MTU set to %d (was %s)", name, self.mtu, link.get("mtu"))

    async def _configure_device(self, ipr: AsyncIPRoute, lease: Lease) -> None:
        """`<subnet network address>/32` the only flannel address on the device, device up."""
        [link] = await ipr.link("get", index=self.index)
        await netlink.own_address_up(ipr, link, lease.subnet, self.ctx.config.network)

    async def _heal_device(self, ipr: AsyncIPRoute, lease: Lease) -> None:
        """The device present, compatible, addressed and up, whatever happened to it."""
        if await self._ensure_device(ipr):
            self._view.invalidate()  # the old device took its entries along
            log.warning(
                "device %s re-created (%s); replaying every peer",
                self._opts.device,
                self._identity(),
            )
        await self._configure_device(ipr, lease)

    async def configure(self, lease: Lease) -> None:
        async with self._lock:
            try:
                await self._heal_device(self._socket(), lease)
            except Exception:
                await self.close()
                raise

    async def _on_link(
        self, ipr: AsyncIPRoute, addrs: Set[IPv4Address], fresh: bool
    ) -> set[IPv4Address]:
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
        """The device is still there and up (one netlink request): setting it down flushes
        the routes through it."""
        async with self._lock:
            try:
                [link] = await self._socket().link("get", index=self.index)
            except NetlinkError:
                return False
            except Exception:
                await self.close()
                raise
        return link.get_attr("IFLA_IFNAME") == self._opts.device and bool(link["flags"] & IFF_UP)

    async def _before_pass(self, ipr: AsyncIPRoute, lease: Lease) -> None:
        await self._heal_device(ipr, lease)

    async def _plan(
        self, ipr: AsyncIPRoute, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool
    ) -> tuple[set[Entry], list[str]]:
        direct = None
        if self._opts.direct_routing:
            candidates = {p.attrs.public_ip for p in peers.values()}
            direct = await self._on_link(ipr, candidates - {lease.attrs.public_ip}, full)
        desired, warnings = plan(lease, peers, self.index, direct, self.ctx.ext.index)
        return set(desired), warnings

    async def _dump(self, ipr: AsyncIPRoute) -> set[Entry]:
        dumped: set[Entry] = set()
        dumped |= await netlink.dump_neighs(ipr, self.index)
        dumped |= await netlink.dump_fdb(ipr, self.index)
        dumped |= await netlink.dump_routes(ipr)  # ours on any device: others are stale
        return dumped

    def _describe(self, entry: Entry) -> str:
        """An entry as iproute2 would print it, with device names."""
        names = {self.index: self._opts.device, self.ctx.ext.index: self.ctx.ext.name}
        if isinstance(entry, Route):
            via = f" via {entry.gateway}" if entry.gateway else ""
            dev = names.get(entry.oif, f"#{entry.oif}")
            return f"{entry.dst}{via} dev {dev}{' onlink' if entry.onlink else ''}"
        dev = names.get(entry.ifindex, f"#{entry.ifindex}")
        if isinstance(entry, Neigh):
            return f"{entry.dst} lladdr {entry.lladdr} dev {dev}"
        return f"{entry.lladdr} dst {entry.dst} dev {dev}"
