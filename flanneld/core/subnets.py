"""IPv4 subnet arithmetic and flannel's subnet keys (`10.244.3.0-24`).

Pure functions only: no I/O. Everything is `ipaddress` objects; strings appear only at the
edges (etcd keys, subnet.env).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_network

# The reference's key grammar: an IPv4 part and an optional IPv6 part joined by '&'.
_KEY_RE = re.compile(r"^([0-9.]+)-([0-9]+)(?:&([0-9a-f:]+)-([0-9]+))?$")


def subnet_key(net: IPv4Network) -> str:
    """The etcd key suffix flannel uses for a subnet: `10.244.3.0-24`."""
    return f"{net.network_address}-{net.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network | None:
    """The IPv4 subnet named by a key suffix, or None when the key is not one the reference
    writes: host bits set (`10.1.1.5-24`), or not in canonical form (`10.244.3.0-024`,
    `010.244.3.0-24`): such a key would name the same subnet as another key, so a put or a
    delete on it could stand in for the real lease's. A dual-stack key
    (`10.5.52.0-24&fc00:0:0:5::-64`) yields its IPv4 part; its IPv6 part must be canonical too
    (compressed, lower case, no host bits)."""
    m = _KEY_RE.match(key)
    if not m:
        return None
    try:
        net = ip_network(f"{m.group(1)}/{m.group(2)}", strict=True)
        v6 = ip_network(f"{m.group(3)}/{m.group(4)}", strict=True) if m.group(3) else None
    except ValueError:
        return None
    if not isinstance(net, IPv4Network) or (v6 is not None and not isinstance(v6, IPv6Network)):
        return None
    canonical = subnet_key(net) + (f"&{v6.network_address}-{v6.prefixlen}" if v6 else "")
    return net if key == canonical else None


def first_host(net: IPv4Network) -> str:
    """FLANNEL_SUBNET's form: the first address after the network address, with the prefix."""
    return f"{net.network_address + 1}/{net.prefixlen}"


def subnet_at(start: IPv4Address, prefixlen: int) -> IPv4Network:
    return IPv4Network(f"{start}/{prefixlen}")


def iter_range(lo: IPv4Address, hi: IPv4Address, prefixlen: int) -> Iterator[IPv4Network]:
    """Subnets of `prefixlen` from `lo` up to and including `hi` (both aligned)."""
    step = 1 << (32 - prefixlen)
    for addr in range(int(lo), int(hi) + 1, step):
        yield IPv4Network((addr, prefixlen))


class OverlapIndex:
    """Answers "does this subnet overlap any of these?" in O(prefix lengths present).

    Subnets are bucketed by prefix length; a candidate overlaps a member exactly when one of
    them contains the other, i.e. when the candidate truncated to the member's prefix (or the
    member truncated to the candidate's) is equal.
    """

    def __init__(self, nets: Iterator[IPv4Network] | list[IPv4Network] = ()) -> None:
        self._by_len: dict[int, set[int]] = {}
        for n in nets:
            self.add(n)

    def add(self, net: IPv4Network) -> None:
        self._by_len.setdefault(net.prefixlen, set()).add(int(net.network_address))

    def overlaps(self, net: IPv4Network) -> bool:
        base = int(net.network_address)
        for plen, members in self._by_len.items():
            if plen <= net.prefixlen:
                mask = (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF
                if base & mask in members:
                    return True
            else:
                span = 1 << (32 - net.prefixlen)
                # members that are smaller than net: any inside [base, base + span)
                if any(base <= m < base + span for m in members):
                    return True
        return False
