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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
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
SPECIAL_RANGES_V6 = {
    IPv6Network("::/8"): "unspecified, loopback and IPv4-mapped (::/8)",
    IPv6Network("fe80::/10"): "link-local",
    IPv6Network("ff00::/8"): "multicast",
}


# The IPv4 part of an IPv6-only lease: its key reads `0.0.0.0-0&fd00:10:244:3::-64`.
NO_IPV4 = IPv4Network("0.0.0.0/0")


class ConfigError(InputError):
    """The network config is missing or invalid; the message says what to fix."""


@dataclass(frozen=True)
class Range6:
    """The IPv6 half of a dual-stack config: IPv6Network, IPv6SubnetLen, IPv6SubnetMin/Max."""

    network: IPv6Network
    subnet_len: int
    subnet_min: IPv6Address
    subnet_max: IPv6Address

    def contains(self, subnet: IPv6Network) -> bool:
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )


@dataclass(frozen=True)
class NetworkConfig:
    """`network` is None in an IPv6-only network (`EnableIPv4: false`): leases then have no
    IPv4 subnet (their key's IPv4 part is `0.0.0.0-0`, as the reference writes it)."""

    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str
    backend: dict[str, Any] = field(default_factory=dict, compare=False)
    enable_nftables: bool = False
    ipv6: Range6 | None = None  # EnableIPv6: leases get an IPv6 subnet too

    @property
    def ipv4(self) -> bool:
        return self.network is not None

    def contains_lease(self, subnet: IPv4Network) -> bool:
        """A lease subnet fits this config: right size, inside [SubnetMin, SubnetMax]; in an
        IPv6-only network, only the empty IPv4 part (`0.0.0.0/0`) fits."""
        if self.network is None:
            return subnet == NO_IPV4
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


@dataclass(frozen=True)
class _Family:
    """The keys and limits of one address family's part of the config (the reference's)."""

    version: int
    prefix: str  # "" or "IPv6"
    bits: int
    smallest: int  # the longest Network prefix that still holds four subnets
    longest: int  # the longest SubnetLen
    default_len: int  # SubnetLen when the Network prefix leaves room for it
    example: str
    special: dict[Any, str]


V4 = _Family(4, "", 32, 28, 30, 24, "10.244.0.0/16", SPECIAL_RANGES)
V6 = _Family(6, "IPv6", 128, 124, 126, 64, "fd00:10:244::/56", SPECIAL_RANGES_V6)


def _address(obj: dict[str, Any], key: str, fam: _Family) -> Any:
    v = ci_get(obj, key)
    if v is None or v == "":
        return None
    try:
        addr = ip_address(v) if isinstance(v, str) else None
    except ValueError:
        addr = None
    if addr is None or addr.version != fam.version:
        raise _bad(
            key,
            f"is not an IPv{fam.version} address (got {json.dumps(v)})",
            f"set {key} to an address inside {fam.prefix or ''}Network",
        )
    return addr


def _range(obj: dict[str, Any], fam: _Family) -> tuple[Any, int, Any, Any]:
    """(Network, SubnetLen, SubnetMin, SubnetMax) of one family, defaults filled in."""
    key = f"{fam.prefix}Network"
    net_s = ci_get(obj, key)
    if not net_s:
        raise _bad(
            key,
            "is missing",
            f'please define a correct {key} parameter, e.g. "{key}": "{fam.example}"',
        )
    try:
        network = (
            ip_network(net_s, strict=False) if isinstance(net_s, str) and "/" in net_s else None
        )
    except ValueError:
        network = None
    if network is None or network.version != fam.version:
        raise _bad(
            key,
            f"is an invalid IPv{fam.version} CIDR format (got {json.dumps(net_s)})",
            f'write it like "{fam.example}"',
        )
    for special, name in fam.special.items():
        if network.overlaps(special):
            raise _bad(
                key,
                f"{network} overlaps the {name} range {special}",
                f'use a private range such as "{fam.example}"',
            )

    len_key = f"{fam.prefix}SubnetLen"
    subnet_len = int_field(obj, len_key) or 0
    plen = network.prefixlen
    if subnet_len == 0:
        if plen > fam.smallest:
            raise _bad(
                key,
                f"/{plen} is too small. Minimum useful network prefix is /{fam.smallest}",
                f"use a larger {key}",
            )
        subnet_len = fam.default_len if plen <= fam.default_len - 2 else plen + 2
    elif subnet_len > fam.longest:
        raise _bad(
            len_key,
            f"must be less than /{fam.longest + 1} (got {subnet_len})",
            f"use {fam.longest} or less",
        )
    elif subnet_len < plen + 2:
        raise _bad(
            len_key,
            f"/{subnet_len} leaves room for fewer than four subnets in {key} /{plen}",
            f"use at least {plen + 2}",
        )

    size = 1 << (fam.bits - subnet_len)
    first, last = int(network.network_address), int(network.broadcast_address)
    subnet_min = _address(obj, f"{fam.prefix}SubnetMin", fam) or ip_address(first + size)
    subnet_max = _address(obj, f"{fam.prefix}SubnetMax", fam) or ip_address(last + 1 - size)
    if fam.version == 6:  # ip_address() of an int below 2**32 is IPv4
        subnet_min, subnet_max = IPv6Address(int(subnet_min)), IPv6Address(int(subnet_max))
    for k, addr in ((f"{fam.prefix}SubnetMin", subnet_min), (f"{fam.prefix}SubnetMax", subnet_max)):
        if addr not in network:
            raise _bad(
                k,
                f"{addr} is not in the range of the {key} {network}",
                f"pick an address inside {key}",
            )
        if int(addr) % size:
            raise _bad(
                k,
                f"{addr} is not on a {len_key} boundary (/{subnet_len})",
                "align it to the subnet size",
            )
    if subnet_min > subnet_max:
        raise _bad(
            f"{fam.prefix}SubnetMin",
            f"{subnet_min} is above {fam.prefix}SubnetMax {subnet_max}",
            "swap them or widen the range",
        )
    return network, subnet_len, subnet_min, subnet_max


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

    enable_ipv4 = bool_field(obj, "EnableIPv4", True)
    enable_ipv6 = bool_field(obj, "EnableIPv6", False)
    if not enable_ipv4 and not enable_ipv6:
        raise _bad(
            "EnableIPv4",
            "is false and EnableIPv6 is not true: the network has no address family",
            'remove EnableIPv4, or add "EnableIPv6": true with an IPv6Network for IPv6-only',
        )
    enable_nftables = bool_field(obj, "EnableNFTables", False)
    if enable_ipv4:
        network, subnet_len, subnet_min, subnet_max = _range(obj, V4)
    else:  # IPv6-only: the IPv4 keys mean nothing
        network, subnet_len = None, 0
        subnet_min = subnet_max = NO_IPV4.network_address
    ipv6 = Range6(*_range(obj, V6)) if enable_ipv6 else None

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

    if ipv6 is not None and backend_type == "udp":
        raise _bad(
            "EnableIPv6",
            "is true, but the udp backend carries IPv4 only (as the reference's)",
            "use host-gw or vxlan for dual-stack or IPv6-only, or remove EnableIPv6",
        )
    return NetworkConfig(
        network, subnet_len, subnet_min, subnet_max, backend_type, backend, enable_nftables, ipv6
    )


def underlay_problem(
    network: IPv4Network | IPv6Network,
    underlay: IPv4Network | IPv6Network | None,
    addrs: Iterable[IPv4Address | IPv6Address],
    key: str = "Network",
) -> str:
    """Why `network` (the config's `key`) cannot be the overlay on a node whose underlay
    interface sits in `underlay` and has or advertises `addrs` ("" when it can): overlay
    routes would capture the nodes' own traffic. The message names the fix."""
    if underlay is not None and network.overlaps(underlay):
        where = f"the underlay network {underlay}"
    elif hit := next((a for a in addrs if a in network), None):
        where = f"this node's address {hit}"
    else:
        return ""
    return (
        f"network config: {key} {network} overlaps {where}; pick a {key} that holds no node "
        "address"
    )
