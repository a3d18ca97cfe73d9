"""The network config stored at `<etcd-prefix>/config`: parsing, defaults and validation.

Follows the reference's rules (keys case-insensitive, SubnetLen/SubnetMin/SubnetMax defaults,
range and alignment checks) and adds what keeps a host working: SubnetMin <= SubnetMax, a
Network clear of the special ranges (default route, loopback, link-local, multicast,
reserved) and of the underlay's own network, a bounded document. Every error is a
`ConfigError` whose message names the key and the fix in one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any

from flanneld.core.bounded import load_bounded
from flanneld.core.errors import InputError

DEFAULT_BACKEND = "udp"  # the reference's code default when "Backend" is absent
MAX_CONFIG = 64 * 1024  # bytes
MAX_DEPTH = 16  # nesting of JSON arrays and objects
# Ranges an overlay must not claim: routes for them would break the host itself.
SPECIAL_RANGES = {
    IPv4Network("0.0.0.0/8"): "'this network' (0.0.0.0/8, and 0.0.0.0/0 is every address)",
    IPv4Network("127.0.0.0/8"): "loopback",
    IPv4Network("169.254.0.0/16"): "link-local",
    IPv4Network("224.0.0.0/4"): "multicast",
    IPv4Network("240.0.0.0/4"): "reserved (and broadcast)",
}


class ConfigError(InputError):
    """The network config is missing or invalid; the message says what to fix."""


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict, compare=False)
    enable_nftables: bool = False

    def contains_lease(self, subnet: IPv4Network) -> bool:
        """A lease subnet fits this config: right size, inside [SubnetMin, SubnetMax]."""
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )


def ci_get(obj: dict[str, Any], key: str, default: Any = None) -> Any:
    """Look a key up the way Go's encoding/json does: exact match first, then any case."""
    if key in obj:
        return obj[key]
    low = key.lower()
    for k, v in obj.items():
        if k.lower() == low:
            return v
    return default


def _bad(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"network config: {key} {problem}; {fix}")


def int_field(
    obj: dict[str, Any], key: str, low: int = 0, high: int = 2**31 - 1, where: str = ""
) -> int | None:
    """The integer at `key` (any case) within [low, high]; None when absent or null.
    `where` prefixes the key in the message ("Backend." for a backend's options)."""
    v = ci_get(obj, key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high):
        raise _bad(
            where + key,
            f"must be an integer from {low} to {high} (got {json.dumps(v)})",
            "fix the value or remove it",
        )
    return v


def bool_field(obj: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    """The boolean at `key` (any case), `default` when absent (null is not absent)."""
    v = ci_get(obj, key, default)
    if not isinstance(v, bool):
        raise _bad(
            where + key, f"must be true or false (got {json.dumps(v)})", "set it to true or false"
        )
    return v


def _ipv4(obj: dict[str, Any], key: str) -> IPv4Address | None:
    v = ci_get(obj, key)
    if v is None or v == "":
        return None
    try:
        addr = ip_address(v) if isinstance(v, str) else None
    except ValueError:
        addr = None
    if not isinstance(addr, IPv4Address):
        raise _bad(
            key, f"is not an IPv4 address (got {json.dumps(v)})", f'set {key} like "10.244.1.0"'
        )
    return addr


def parse_config(raw: bytes | str) -> NetworkConfig:
    """Parse and validate the JSON network config, filling in the reference's defaults."""
    try:
        obj = load_bounded(raw, "network config", MAX_CONFIG, MAX_DEPTH)
    except ValueError as e:
        raise ConfigError(f"{e}; fix the JSON document") from None
    if not isinstance(obj, dict):
        raise ConfigError(
            'network config must be a JSON object such as {"Network": "10.244.0.0/16"}'
        )

    if not bool_field(obj, "EnableIPv4", True):
        raise _bad(
            "EnableIPv4",
            "is false, but this agent runs IPv4 overlays only",
            "remove EnableIPv4 or set it to true",
        )
    enable_nftables = bool_field(obj, "EnableNFTables", False)
    if bool_field(obj, "EnableIPv6", False):
        raise _bad(
            "EnableIPv6",
            "is true, but this agent runs IPv4 overlays only",
            "remove EnableIPv6 or set it to false",
        )

    net_s = ci_get(obj, "Network")
    if not net_s:
        raise _bad(
            "Network",
            "is missing",
            'please define a correct Network parameter, e.g. "Network": "10.244.0.0/16"',
        )
    try:
        network = (
            ip_network(net_s, strict=False) if isinstance(net_s, str) and "/" in net_s else None
        )
    except ValueError:
        network = None
    if not isinstance(network, IPv4Network):
        raise _bad(
            "Network",
            f"is an invalid IPv4 CIDR format (got {json.dumps(net_s)})",
            'write it like "10.244.0.0/16"',
        )

    for special, name in SPECIAL_RANGES.items():
        if network.overlaps(special):
            raise _bad(
                "Network",
                f"{network} overlaps the {name} range {special}",
                'use a private range such as "10.244.0.0/16"',
            )

    subnet_len = int_field(obj, "SubnetLen") or 0
    plen = network.prefixlen
    if subnet_len == 0:
        if plen > 28:
            raise _bad(
                "Network",
                f"/{plen} is too small. Minimum useful network prefix is /28",
                "use a larger Network",
            )
        subnet_len = 24 if plen <= 22 else plen + 2
    elif subnet_len > 30:
        raise _bad("SubnetLen", f"must be less than /31 (got {subnet_len})", "use 30 or less")
    elif subnet_len < plen + 2:
        raise _bad(
            "SubnetLen",
            f"/{subnet_len} leaves room for fewer than four subnets in Network /{plen}",
            f"use at least {plen + 2}",
        )

    size = 1 << (32 - subnet_len)
    subnet_min = _ipv4(obj, "SubnetMin") or network.network_address + size
    subnet_max = _ipv4(obj, "SubnetMax") or IPv4Address(int(network.broadcast_address) + 1 - size)
    for key, addr in (("SubnetMin", subnet_min), ("SubnetMax", subnet_max)):
        if addr not in network:
            raise _bad(
                key,
                f"{addr} is not in the range of the Network {network}",
                "pick an address inside Network",
            )
        if int(addr) % size:
            raise _bad(
                key,
                f"{addr} is not on a SubnetLen boundary (/{subnet_len})",
                "align it to the subnet size",
            )
    if subnet_min > subnet_max:
        raise _bad(
            "SubnetMin",
            f"{subnet_min} is above SubnetMax {subnet_max}",
            "swap them or widen the range",
        )

    backend = ci_get(obj, "Backend")
    if backend is None:
        backend_type = DEFAULT_BACKEND
        backend = {}
    elif not isinstance(backend, dict):
        raise _bad("Backend", "must be an object", 'write it like "Backend": {"Type": "vxlan"}')
    else:
        bt = ci_get(backend, "Type", "")
        if not isinstance(bt, str) or not bt:
            raise _bad(
                "Backend.Type",
                f"is missing or not a string (got {json.dumps(bt)})",
                'set it, e.g. "Type": "vxlan"',
            )
        backend_type = bt.lower()

    return NetworkConfig(
        network, subnet_len, subnet_min, subnet_max, backend_type, backend, enable_nftables
    )


def underlay_problem(
    network: IPv4Network, underlay: IPv4Network | None, addrs: Iterable[IPv4Address]
) -> str:
    """Why `network` cannot be the overlay on a node whose underlay interface sits in
    `underlay` and has or advertises `addrs` ("" when it can): overlay routes would capture
    the nodes' own traffic. The message names the fix."""
    if underlay is not None and network.overlaps(underlay):
        where = f"the underlay network {underlay}"
    elif hit := next((a for a in addrs if a in network), None):
        where = f"this node's address {hit}"
    else:
        return ""
    return (
        f"network config: Network {network} overlaps {where}; pick a Network that holds no "
        "node address"
    )
