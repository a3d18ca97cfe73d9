"""Subnet arithmetic and flannel's subnet keys (`10.244.3.0-24`, dual-stack `…&fd00::-64`).

Pure functions only: no I/O. Everything is `ipaddress` objects; strings appear only at the
edges (etcd keys, subnet.env).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address

# The reference's key grammar: an IPv4 part and an optional IPv6 part joined by '&'.
_KEY_RE = re.compile(r"^([0-9.]+)-([0-9]+)(?:&([0-9a-f:]+)-([0-9]+))?$")


def subnet_key(net: IPv4Network, net6: IPv6Network | None = None) -> str:
    """The etcd key suffix flannel uses for a lease: `10.244.3.0-24`, or with an IPv6 subnet
    `10.244.3.0-24&fd00:10:244:3::-64` (the address compressed, as Go prints it)."""
    key = f"{net.network_address}-{net.prefixlen}"
    return f"{key}&{net6.network_address}-{net6.prefixlen}" if net6 is not None else key


def parse_key(key: str) -> tuple[IPv4Network, IPv6Network | None] | None:
    """The subnets named by a key suffix, or None when the key is not one the reference
    writes: host bits set (`10.1.1.5-24`), or not in canonical form (`10.244.3.0-024`,
    `010.244.3.0-24`, an IPv6 part not compressed or in upper case): such a key would name the
    same subnet as another key, so a put or a delete on it could stand in for the real
    lease's."""
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
    return (net, v6) if key == subnet_key(net, v6) else None


def ident_of(net: IPv4Network, net6: IPv6Network | None) -> Network:
    """The subnet that names a lease (`Lease.ident`): its IPv4 one, or for an IPv6-only lease
    (IPv4 part `0.0.0.0-0`) its IPv6 one."""
    return net6 if net6 is not None and net.prefixlen == 0 else net


def parse_subnet_key(key: str) -> IPv4Network | None:
    """The IPv4 subnet of a key (see `parse_key`), or None."""
    parsed = parse_key(key)
    return parsed[0] if parsed else None


def first_host(net: IPv4Network | IPv6Network) -> str:
    """FLANNEL_SUBNET's (and FLANNEL_IPV6_SUBNET's) form: the first address after the network
    address, with the prefix."""
    return f"{net.network_address + 1}/{net.prefixlen}"


def subnet_at(start: IPv4Address, prefixlen: int) -> IPv4Network:
    return IPv4Network(f"{start}/{prefixlen}")


def iter_range(lo: Address, hi: Address, prefixlen: int) -> Iterator[Network]:
    """Subnets of `prefixlen` from `lo` up to and including `hi` (both aligned, one family)."""
    cls = IPv4Network if lo.version == 4 else IPv6Network
    step = 1 << (lo.max_prefixlen - prefixlen)
    for addr in range(int(lo), int(hi) + 1, step):
        yield cls((addr, prefixlen))


class OverlapIndex:
    """Answers "does this subnet overlap any of these?" in O(prefix lengths present), for the
    subnets of one address family.

    Subnets are bucketed by prefix length; a candidate overlaps a member exactly when one of
    them contains the other, i.e. when the candidate truncated to the member's prefix (or the
    member truncated to the candidate's) is equal.
    """

    def __init__(self, nets: Iterable[Network] = ()) -> None:
        self._by_len: dict[int, set[int]] = {}
        for n in nets:
            self.add(n)

    def add(self, net: Network) -> None:
        self._by_len.setdefault(net.prefixlen, set()).add(int(net.network_address))

    def overlaps(self, net: Network) -> bool:
        base, bits = int(net.network_address), net.max_prefixlen
        full = (1 << bits) - 1
        for plen, members in self._by_len.items():
            if plen <= net.prefixlen:
                mask = (full << (bits - plen)) & full
                if base & mask in members:
                    return True
            else:
                span = 1 << (bits - net.prefixlen)
                # members that are smaller than net: any inside [base, base + span)
                if any(base <= m < base + span for m in members):
                    return True
        return False
