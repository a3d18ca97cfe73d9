"""The vxlan backend's pure half: its options, the VTEP MACs, and the plan of the entries for a
set of peers (per peer a permanent ARP/NDP entry, an FDB entry and an onlink route, or with
DirectRouting a plain route). No I/O: `backends.vxlan` creates the devices and applies the plan.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flanneld.core.config import ConfigError, bool_field, ci_get, int_field
from flanneld.core.lease import Lease

from .base import ipv6_half_problem, skip_reason
from .reconcile import Fdb, Neigh, Route, is_unicast

TYPE = "vxlan"
DEFAULT_PORT = 8472  # the kernel's default, which the reference's Port 0 means
ENCAP_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
ENCAP_OVERHEAD6 = 70  # outer Ethernet 14 + IPv6 40 + UDP 8 + VXLAN 8
MIN_IPV4_MTU = 68
MIN_IPV6_MTU = 1280  # below it the kernel runs no IPv6 on a device
MAX_VNI = 9_999_999  # "flannel." + 7 digits fills the kernel's 15-character interface name
MAX_VNI6 = 9_999  # "flannel-v6." + 4 digits does
REWRITE = "restart the agent on that node to rewrite its lease"
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
    return mac if is_unicast(mac) else None


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
        why = ipv6_half_problem(local, peer, REWRITE) or p.peer(
            owner, peer.ipv6_subnet, attrs.public_ipv6, peer_mac6(peer), data6, vx6_index
        )
        if why:
            skip = f"skipping the IPv6 subnet of peer lease {subnet}"
            warnings.append(f"{skip} (PublicIPv6 {attrs.public_ipv6 or 'none'}): {why}")
    return p.entries, warnings
