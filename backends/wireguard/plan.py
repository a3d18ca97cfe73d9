"""The wireguard backend's plan (pure): the peers each device should have for the leases, and
why a lease gets none.

A peer lease becomes one WireGuard peer on `flannel-wg`: its BackendData's `PublicKey`,
endpoint `PublicIP:ListenPort` (the same port on every node, as the reference), allowed-ips
its subnet, the config's keepalive and PSK. In a dual-stack network it also becomes one on
`flannel-wg-v6`: BackendV6Data's `PublicKey`, endpoint `[PublicIPv6]:ListenPortV6`, its IPv6
subnet. Each is checked first, as vxlan checks a VtepMAC: a record without a usable key
(missing, not base64 of 32 bytes, of small order, ours, or one an older lease announced first)
is skipped with one warning naming the fix, and the other peers go on. `plan_single` is the
same for the single-device modes (below).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from flanneld.core.config import ci_get
from flanneld.core.lease import Lease, LeaseAttrs

from ..base import ipv6_half_problem, skip_reason
from .keys import BadKey, decode_key, encode_key, peer_key_problem
from .uapi import NO_KEY, PeerConfig

TYPE = "wireguard"
FIX = "restart the agent on that node to rewrite its lease"


def record_key(data: object, field: str = "BackendData") -> tuple[bytes | None, str]:
    """The public key a lease's BackendData (or BackendV6Data) announces, or None and why."""
    text = ci_get(data, "PublicKey") if isinstance(data, dict) else None
    if text is None:
        return None, f"its {field} {json.dumps(data)[:120]} has no PublicKey; {FIX}"
    try:
        key = decode_key(text)
    except BadKey as e:
        return None, f"its PublicKey {e}; {FIX}"
    if why := peer_key_problem(key):
        return None, f"its PublicKey {text!r} is unusable: {why}; {FIX}"
    return key, ""


def plan(
    local: Lease,
    peers: Mapping[IPv4Network, Lease],
    port: int,
    keepalive: int = 0,
    psk: bytes | None = None,
    version: int = 4,
) -> tuple[set[PeerConfig], list[str]]:
    """The peers of the device for IP `version` (4: `flannel-wg`, 6: `flannel-wg-v6`), and one
    warning per lease skipped (for 6, only what concerns the IPv6 half: the rest is said once
    for 4).

    Leases are taken oldest first (etcd create revision), so a record that copies another
    node's PublicKey never takes that node's place: the key is the older lease's."""
    field = "BackendData" if version == 4 else "BackendV6Data"
    ours, _ = record_key(local.attrs.backend_data if version == 4 else local.attrs.backend_v6_data)
    owners: dict[bytes, str] = {ours: "ours"} if ours else {}
    planned: set[PeerConfig] = set()
    warnings: list[str] = []
    for subnet, peer in sorted(peers.items(), key=lambda kv: (kv[1].create_revision, kv[0])):
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            if version == 4:
                warnings.append(why)
            continue
        attrs = peer.attrs
        if version == 4:
            net, ip, data = subnet, attrs.public_ip, attrs.backend_data
            where = f"peer lease {subnet} (PublicIP {ip})"
            key, why = record_key(data, field)
        else:
            net, ip, data = peer.ipv6_subnet, attrs.public_ipv6, attrs.backend_v6_data
            where = f"the IPv6 subnet of peer lease {subnet} (PublicIPv6 {ip or 'none'})"
            key, why = None, ipv6_half_problem(local, peer, FIX)
            if not why:
                key, why = record_key(data, field)
        if key is not None and key in owners:
            why = (
                f"its PublicKey {encode_key(key)} is also {owners[key]}; every node needs a key "
                "of its own: delete the copied key file on that node and restart its agent"
            )
        if why or key is None or net is None or ip is None:
            warnings.append(f"skipping {where}: {why}")
            continue
        owners[key] = f"that of {subnet}"
        planned.add(PeerConfig(key, (ip, port), frozenset({net}), keepalive, psk or NO_KEY))
    return planned, warnings


# The reference's single-device modes ("auto", "ipv4", "ipv6" with EnableIPv6): one device,
# `flannel-wg` on ListenPort, one WireGuard peer per lease whose allowed-ips are both its
# subnets; its key is BackendV6Data's (BackendData's when that has none); its endpoint is
# PublicIP ("ipv4"), PublicIPv6 ("ipv6"), or for "auto" as `endpoint_for` picks.
_PRIVATE4 = tuple(IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_PRIVATE6 = IPv6Network("fc00::/7")


def private(ip: IPv4Address | IPv6Address) -> bool:
    """Private as the reference counts it: RFC 1918, and for IPv6 unique local (fc00::/7)."""
    if ip.version == 4:
        return any(ip in net for net in _PRIVATE4)
    return ip in _PRIVATE6


def endpoint_for(
    attrs: LeaseAttrs, mode: str, have4: bool, own6: IPv6Address | None
) -> IPv4Address | IPv6Address | None:
    """The address to send to a peer at. "auto", as the reference: the only one it has; else
    IPv4 when the peer's is not private and this node has IPv4, IPv6 when both the peer's and
    ours are not private, else IPv4. A PublicIP 0.0.0.0 (an IPv6-only lease) is none."""
    ip4 = None if attrs.public_ip.is_unspecified else attrs.public_ip
    ip6 = attrs.public_ipv6
    if mode in ("ipv4", "ipv6"):
        return ip4 if mode == "ipv4" else ip6
    if ip4 is None or ip6 is None:
        return ip4 or ip6
    if not private(ip4) and have4:
        return ip4
    if not private(ip6) and own6 is not None and not private(own6):
        return ip6
    return ip4


def plan_single(
    local: Lease,
    peers: Mapping[IPv4Network, Lease],
    port: int,
    mode: str,
    versions: tuple[int, ...],
    keepalive: int = 0,
    psk: bytes | None = None,
    have4: bool = True,
    own6: IPv6Address | None = None,
) -> tuple[set[PeerConfig], list[str]]:
    """The peers of `flannel-wg` in a single-device mode for the network's IP `versions`, and
    one warning per lease (or IPv6 half) skipped; oldest lease first, as `plan`."""
    local_data = local.attrs.backend_v6_data or local.attrs.backend_data
    ours, _ = record_key(local_data)
    owners: dict[bytes, str] = {ours: "ours"} if ours else {}
    planned: set[PeerConfig] = set()
    warnings: list[str] = []
    for subnet, peer in sorted(peers.items(), key=lambda kv: (kv[1].create_revision, kv[0])):
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            warnings.append(why)
            continue
        attrs, nets = peer.attrs, set[IPv4Network | IPv6Network]()
        where = f"peer lease {peer.ident} (PublicIP {attrs.node_ip})"
        if 4 in versions and peer.has_ipv4:
            nets.add(subnet)
        if 6 in versions:
            if why := ipv6_half_problem(local, peer, FIX):
                warnings.append(f"skipping the IPv6 subnet of {where}: {why}")
            elif peer.ipv6_subnet is not None:
                nets.add(peer.ipv6_subnet)
        six = 6 in versions and attrs.backend_v6_data is not None
        data, field = (
            (attrs.backend_v6_data, "BackendV6Data") if six else (attrs.backend_data, "BackendData")
        )
        key, why = record_key(data, field)
        if key is not None and key in owners:
            why = (
                f"its PublicKey {encode_key(key)} is also {owners[key]}; every node needs a key "
                "of its own: delete the copied key file on that node and restart its agent"
            )
        ip = endpoint_for(attrs, mode, have4, own6)
        if not why and ip is None:
            why = f'it has no {"PublicIPv6" if mode == "ipv6" else "PublicIP"} for Mode "{mode}"'
        if why or key is None or ip is None or not nets:
            warnings.append(f"skipping {where}: {why or 'it has no subnet of this network'}")
            continue
        owners[key] = f"that of {peer.ident}"
        planned.add(PeerConfig(key, (ip, port), frozenset(nets), keepalive, psk or NO_KEY))
    return planned, warnings
