"""Kernel entries the backends own, and the diff of desired against actual entries.

Pure: no I/O. `backends.netlink` turns a `Diff` into netlink calls.

Theory of operation: every entry is a frozen dataclass with a `kind` ("route", "arp", "fdb")
and a `key`, its identity in the kernel (a route is identified by its destination, an ARP
entry by device and IP, an FDB entry by device and MAC). Two entries with the same kind and
key but different fields are one kernel object whose value must change: an upsert (netlink
`replace`). An actual entry whose key is not desired is removed. The diff assumes at most one
actual entry per key, which holds for everything written with `replace`.

Order matters for vxlan: a route via the VXLAN device must be added only after its ARP and FDB
entries exist (or the kernel ARPs for the gateway), and removed before them. `RANK` orders
kinds: upserts run by ascending rank, removals by descending rank, and `apply` runs all
removals before all upserts (they never share a key, so nothing is removed that an upsert
needs).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from flanneld.core.lease import Lease

RANK: dict[str, int] = {"arp": 0, "fdb": 1, "route": 2}


class Entry(Protocol):
    kind: ClassVar[str]
    slot: tuple[Hashable, ...]  # (kind, key) as bytes and ints: the kernel object it is
    ident: tuple[Hashable, ...]  # the slot and every other field, likewise: its value

    @property
    def key(self) -> Hashable: ...


# Entries by the ten thousand are hashed and compared on every pass: each carries its slot and
# ident as tuples of ints and strings (computed once; what `rtnl` reads off the wire, so a dump
# can find an entry it already knows without building one), and compares by them. Addresses
# are their ints (`addr_key`): the very int objects the address objects hold, so an entry costs
# no bytes object per address; hashing an ident again is cheaper than keeping its hash.
V6_MARK = 1 << 128  # added to an IPv6 address's int: it never equals an IPv4 one


def addr_key(addr: IPv4Address | IPv6Address) -> int:
    return int(addr) if addr.version == 4 else int(addr) + V6_MARK


def raw_key(raw: bytes) -> int:
    """`addr_key` of an address as the kernel sends it (4 or 16 bytes, network order)."""
    n = int.from_bytes(raw, "big")
    return n if len(raw) == 4 else n + V6_MARK


def _set(entry: object, slot: tuple, ident: tuple) -> None:
    object.__setattr__(entry, "slot", slot)
    object.__setattr__(entry, "ident", ident)


class _Compared:
    __slots__ = ()
    ident: tuple

    def __hash__(self) -> int:
        return hash(self.ident)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self is other or self.ident == other.ident  # type: ignore[attr-defined]


def is_unicast(mac: str) -> bool:
    """A MAC `aa:bb:…` (lower case) names one station: neither all zeros nor a group address."""
    return mac != "00:00:00:00:00:00" and not int(mac[:2], 16) & 1


def _lower(mac: str) -> str:
    """`mac` in lower case: the very string when it is (the plan's and the dump's are)."""
    return low if (low := mac.lower()) != mac else mac


def route_slot(dst: int, dst_len: int) -> tuple[str, int, int]:
    return ("route", dst, dst_len)


def route_ident(slot: tuple, gateway: int, oif: int, onlink: bool) -> tuple:
    """A route's ident; `gateway` is -1 for none."""
    return (slot, gateway, oif, onlink)


def neigh_slot(ifindex: int, dst: int) -> tuple[str, int, int]:
    return ("arp", ifindex, dst)


def fdb_slot(ifindex: int, lladdr: str) -> tuple[str, int, str]:
    return ("fdb", ifindex, lladdr)


@dataclass(frozen=True, eq=False, slots=True)
class Route(_Compared):
    """`dst via gateway dev oif [onlink]` in the main table; no gateway only when dumped."""

    kind: ClassVar[str] = "route"
    dst: IPv4Network | IPv6Network
    gateway: IPv4Address | IPv6Address | None
    oif: int
    onlink: bool = False
    slot: tuple = field(init=False, repr=False)
    ident: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "onlink", bool(self.onlink))
        slot = route_slot(addr_key(self.dst.network_address), self.dst.prefixlen)
        gateway = addr_key(self.gateway) if self.gateway is not None else -1
        _set(self, slot, route_ident(slot, gateway, self.oif, self.onlink))

    @property
    def key(self) -> IPv4Network | IPv6Network:
        return self.dst

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        return f"route {self.dst}{via} dev #{self.oif}{' onlink' if self.onlink else ''}"


@dataclass(frozen=True, eq=False, slots=True)
class Neigh(_Compared):
    """A permanent ARP (or, for an IPv6 `dst`, NDP) entry `dst lladdr dev ifindex`; the MAC is
    kept in lower case."""

    kind: ClassVar[str] = "arp"
    ifindex: int
    dst: IPv4Address | IPv6Address
    lladdr: str
    slot: tuple = field(init=False, repr=False)
    ident: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lladdr", _lower(self.lladdr))
        slot = neigh_slot(self.ifindex, addr_key(self.dst))
        _set(self, slot, (slot, self.lladdr))

    @property
    def key(self) -> tuple[int, IPv4Address | IPv6Address]:
        return (self.ifindex, self.dst)

    def __str__(self) -> str:
        return f"arp {self.dst} lladdr {self.lladdr} dev #{self.ifindex}"


@dataclass(frozen=True, eq=False, slots=True)
class Fdb(_Compared):
    """An FDB entry `lladdr dst ip dev ifindex`; the MAC is kept in lower case."""

    kind: ClassVar[str] = "fdb"
    ifindex: int
    lladdr: str
    dst: IPv4Address | IPv6Address
    slot: tuple = field(init=False, repr=False)
    ident: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lladdr", _lower(self.lladdr))
        slot = fdb_slot(self.ifindex, self.lladdr)
        _set(self, slot, (slot, addr_key(self.dst)))

    @property
    def key(self) -> tuple[int, str]:
        return (self.ifindex, self.lladdr)

    def __str__(self) -> str:
        return f"fdb {self.lladdr} dst {self.dst} dev #{self.ifindex}"


def _order(entries: Iterable[Entry], descending: bool) -> list[Entry]:
    # Within a rank and an address family all keys have one type, so this always compares.
    # The slot sorts as the key does (addresses as ints, then the prefix length).
    sign = -1 if descending else 1
    return sorted(entries, key=lambda e: (sign * RANK[e.kind], _version(e), e.slot))


def _version(e: Entry) -> int:
    return e.dst.version if isinstance(e, (Route, Neigh)) else 0


@dataclass(frozen=True)
class Diff:
    upsert: frozenset[Entry]
    remove: frozenset[Entry]

    def __bool__(self) -> bool:
        return bool(self.upsert or self.remove)

    def ordered_upserts(self) -> list[Entry]:
        """Upserts by ascending `RANK` (ARP, FDB, then routes), by key within a kind."""
        return _order(self.upsert, descending=False)

    def ordered_removes(self) -> list[Entry]:
        """Removals by descending `RANK` (routes, FDB, then ARP), by key within a kind."""
        return _order(self.remove, descending=True)


def diff(desired: Iterable[Entry], actual: Iterable[Entry]) -> Diff:
    """What to change so that `actual` becomes `desired`, matching entries by (kind, key).

    Set differences do the work (thousands of entries, most of them equal on both sides): an
    entry wanted but not present as it is gets upserted; one present but not wanted is removed
    unless an upsert of the same key replaces it."""
    want = desired if isinstance(desired, (set, frozenset)) else set(desired)
    have = actual if isinstance(actual, (set, frozenset)) else set(actual)
    upsert = frozenset(want - have)
    replaced = {e.slot for e in upsert}
    remove = frozenset(e for e in have - want if e.slot not in replaced)
    return Diff(upsert, remove)


class KernelView:
    """What a backend owns in the kernel, as far as it knows, by slot.

    A full pass replaces it with a fresh dump (`refresh`); between full passes it follows what
    the backend itself applied (`applied`), so a pass triggered by one peer event costs a plan
    and a diff, not a dump of thousands of entries. Drift made by others (a hand-deleted route)
    is seen by the next full pass. `invalidate` forces the next pass to dump.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, Entry] | None = None

    @property
    def known(self) -> bool:
        return self._entries is not None

    def entries(self) -> set[Entry]:
        return set(self._entries.values()) if self._entries is not None else set()

    def get(self, slot: tuple) -> Entry | None:
        return self._entries.get(slot) if self._entries is not None else None

    def refresh(self, dumped: Iterable[Entry]) -> None:
        self._entries = {e.slot: e for e in dumped}

    def applied(self, upserted: Iterable[Entry], removed: Iterable[Entry]) -> None:
        if self._entries is None:
            return
        for e in removed:
            self._entries.pop(e.slot, None)
        for e in upserted:
            self._entries[e.slot] = e

    def invalidate(self) -> None:
        self._entries = None


def missing_by_peer(
    desired: Iterable[Entry], actual: Iterable[Entry], peers: Mapping[IPv4Network, Lease]
) -> dict[IPv4Network, list[Entry]]:
    """Desired entries absent from `actual` (or different there), grouped by the peer they
    serve (by its IPv4 subnet): a route by its destination, an ARP/NDP entry by the subnet
    holding its IP, an FDB entry by the peer whose PublicIP (or PublicIPv6) it points at.
    Every peer appears, with [] when nothing is missing.
    """
    have = set(actual)
    by_ip: dict[object, IPv4Network] = {}
    by_net: dict[object, IPv4Network] = {}
    for subnet, lease in peers.items():
        by_ip[lease.attrs.public_ip] = by_net[subnet] = subnet
        if lease.attrs.public_ipv6 is not None:
            by_ip[lease.attrs.public_ipv6] = subnet
        if lease.ipv6_subnet is not None:
            by_net[lease.ipv6_subnet] = subnet
    out: dict[IPv4Network, list[Entry]] = {subnet: [] for subnet in peers}
    for e in sorted(set(desired) - have, key=lambda e: (RANK[e.kind], str(e.key))):
        if isinstance(e, Route):
            owner = by_net.get(e.dst)
        elif isinstance(e, Neigh):
            owner = next((by_net[n] for n in by_net if e.dst in n), None)
        else:
            owner = by_ip.get(e.dst)
        if owner is not None:
            out[owner].append(e)
    return out
