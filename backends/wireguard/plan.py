"""The wireguard backend's plan (pure): the peers each device should have for the leases, and
why a lease gets none.

A peer lease becomes one WireGuard peer on `flannel-wg`: its BackendData's `PublicKey`,
endpoint `PublicIP:ListenPort` (the same port on every node, as the reference), allowed-ips
its subnet, the config's keepalive and PSK. In a dual-stack network it also becomes one on
`flannel-wg-v6`: BackendV6Data's `PublicKey`, endpoint `[PublicIPv6]:ListenPortV6`, its IPv6
subnet. Each is checked first, as vxlan checks a VtepMAC: a record without a usable key
(missing, not base64 of 32 bytes, of small order, ours, or one an older lease announced first)
is skipped with one warning naming the fix, and the other peers go on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from ipaddress import IPv4Network

from flanneld.core.config import ci_get
from flanneld.core.lease import Lease

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
