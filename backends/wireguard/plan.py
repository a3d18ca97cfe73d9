"""The wireguard backend's plan (pure): the peers the device should have for the leases, and
why a lease gets none.

A peer lease becomes one WireGuard peer: its BackendData's `PublicKey`, endpoint
`PublicIP:ListenPort` (the same port on every node, as the reference), allowed-ips its subnet,
the config's keepalive and PSK. Each is checked first, as vxlan checks a VtepMAC: a record
without a usable key (missing, not base64 of 32 bytes, of small order, ours, or one an older
lease announced first) is skipped with one warning naming the fix, and the other peers go on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from ipaddress import IPv4Network

from flanneld.core.config import ci_get
from flanneld.core.lease import Lease

from ..base import skip_reason
from .keys import BadKey, decode_key, encode_key, peer_key_problem
from .uapi import NO_KEY, PeerConfig

TYPE = "wireguard"
FIX = "restart the agent on that node to rewrite its lease"


def record_key(data: object) -> tuple[bytes | None, str]:
    """The public key a lease's BackendData announces, or None and why not."""
    text = ci_get(data, "PublicKey") if isinstance(data, dict) else None
    if text is None:
        return None, f"its BackendData {json.dumps(data)[:120]} has no PublicKey"
    try:
        key = decode_key(text)
    except BadKey as e:
        return None, f"its PublicKey {e}"
    if why := peer_key_problem(key):
        return None, f"its PublicKey {text!r} is unusable: {why}"
    return key, ""


def plan(
    local: Lease,
    peers: Mapping[IPv4Network, Lease],
    port: int,
    keepalive: int = 0,
    psk: bytes | None = None,
) -> tuple[set[PeerConfig], list[str]]:
    """The device's peers for `peers`, and one warning per lease skipped.

    Leases are taken oldest first (etcd create revision), so a record that copies another
    node's PublicKey never takes that node's place: the key is the older lease's."""
    ours, _ = record_key(local.attrs.backend_data)
    owners: dict[bytes, str] = {ours: "ours"} if ours else {}
    planned: set[PeerConfig] = set()
    warnings: list[str] = []
    for subnet, peer in sorted(peers.items(), key=lambda kv: (kv[1].create_revision, kv[0])):
        if why := skip_reason(local, subnet, peer, (TYPE,)):
            warnings.append(why)
            continue
        key, why = record_key(peer.attrs.backend_data)
        if key is not None and key in owners:
            why = f"its PublicKey {encode_key(key)} is also {owners[key]}; every node needs its own"
        if why:
            where = f"peer lease {subnet} (PublicIP {peer.attrs.public_ip})"
            warnings.append(f"skipping {where}: {why}; {FIX}")
            continue
        owners[key] = f"that of {subnet}"
        endpoint = (peer.attrs.public_ip, port)
        planned.add(PeerConfig(key, endpoint, frozenset({subnet}), keepalive, psk or NO_KEY))
    return planned, warnings
