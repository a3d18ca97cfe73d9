"""The plan kept from pass to pass: each peer's entries, re-planned only when its lease (or what
the plan reads of the kernel for it) changed. Pure: no I/O.

Theory of operation. A backend's `plan(local, peers)` is a pure function of the whole peer
set, but a peer's entries depend on the other peers in one way only: two peers may claim the
same thing that only one can have (vxlan: a VtepMAC; the older lease keeps it). So the cache
keeps, per group of peers, the entries `plan` gives that group alone. A group is one peer, or
the peers tied together by a contested claim, planned together so that `plan` itself settles
who wins. When a peer changes, it, the members of its old group and every peer sharing one of
its old or new claims are re-planned (closed over the claims they share), and nothing else is.
Anything else the plan reads (our own lease, device indices) is the `context`: when it changes
the whole plan is made again. `desired` is the union of the groups' entries, by slot, and
`update` says which slots changed, so a pass after a peer event diffs only those.

The result equals `plan(local, all peers)` (a property test checks it on random sequences):
entries of different groups never share a slot (a peer's routes and ARP entries are keyed by
its own subnets, and what two peers could both want is a claim).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network

from flanneld.core.lease import Lease

from .reconcile import Entry

PlanFn = Callable[[Mapping[IPv4Network, Lease]], tuple[set[Entry], list[str]]]


def _no_claims(lease: Lease) -> tuple[Hashable, ...]:
    return ()


def _no_inputs(lease: Lease) -> Hashable:
    return None


@dataclass(frozen=True)
class Planner:
    """How a backend plans now: `plan` for any subset of the peers; `context`, everything it
    reads besides the peers; `claims` of a lease, what only one peer can have; `inputs` of a
    lease, what the plan reads for that peer beyond its lease (vxlan: whether its PublicIP is
    on-link), re-planning the peer when it changes."""

    context: Hashable
    plan: PlanFn
    claims: Callable[[Lease], Iterable[Hashable]] = _no_claims
    inputs: Callable[[Lease], Hashable] = _no_inputs


@dataclass(frozen=True, slots=True)
class _Group:
    members: tuple[IPv4Network, ...]
    entries: tuple[Entry, ...]
    warnings: tuple[str, ...]


@dataclass
class Update:
    """What one `update` changed: the slots whose desired entry changed, and the entry each
    of them had before (absent: none)."""

    slots: set[tuple]
    before: dict[tuple, Entry]
    rebuilt: bool  # the context changed: everything was planned afresh


class PlanCache:
    def __init__(self) -> None:
        self.desired: dict[tuple, Entry] = {}  # by slot
        self._reset(_Unset)

    def _reset(self, context: Hashable) -> None:
        self._context = context
        self._leases: dict[IPv4Network, tuple[Lease, Hashable]] = {}  # planned from
        self._claims: dict[IPv4Network, tuple[Hashable, ...]] = {}
        self._holders: dict[Hashable, tuple[IPv4Network, ...]] = {}  # claim -> its claimants
        # each peer's group; a peer planned alone and without a warning (nearly all of them)
        # keeps just its entries, which is a third of the memory
        self._group: dict[IPv4Network, _Group | tuple[Entry, ...]] = {}
        self._warned: dict[tuple[IPv4Network, ...], tuple[str, ...]] = {}  # groups with any

    def warnings(self) -> list[str]:
        return [w for ws in self._warned.values() for w in ws]

    def update(self, planner: Planner, peers: Mapping[IPv4Network, Lease]) -> Update:
        """Bring the plan up to `peers`; what changed."""
        rebuilt = planner.context != self._context
        before: dict[tuple, Entry] = {}
        if rebuilt:
            before, self.desired = self.desired, {}
            self._reset(planner.context)
        dirty = self._dirty(planner, peers)
        fresh: dict[IPv4Network, tuple[Hashable, ...]] = {}  # claims, each asked for once

        def claims(subnet: IPv4Network) -> tuple[Hashable, ...]:
            if (got := fresh.get(subnet)) is None:
                lease = peers.get(subnet)
                got = () if lease is None else tuple(dict.fromkeys(planner.claims(lease)))
                got = tuple(c for c in got if c is not None)
                fresh[subnet] = got
            return got

        self._closure(dirty, claims)
        for subnet in dirty:
            self._drop_group(subnet, before)
            self._set_claims(subnet, planner, peers.get(subnet), claims(subnet))
        slots = set(before)
        for members in self._components(dirty & peers.keys()):
            slots.update(self._plan_group(planner, {s: peers[s] for s in members}))
        return Update(slots, before, rebuilt)

    # -- which peers to re-plan -------------------------------------------------------------
    def _dirty(self, planner: Planner, peers: Mapping[IPv4Network, Lease]) -> set[IPv4Network]:
        """Peers new, changed (lease or inputs) or gone since the last update."""
        dirty: set[IPv4Network] = set()
        known = self._leases
        kept = 0
        for subnet, lease in peers.items():
            was = known.get(subnet)
            if was is None:
                dirty.add(subnet)
                continue
            kept += 1
            if (was[0] is not lease and was[0] != lease) or planner.inputs(lease) != was[1]:
                dirty.add(subnet)
        if kept < len(known):  # some are gone
            dirty.update(s for s in known if s not in peers)
        return dirty

    def _closure(
        self, dirty: set[IPv4Network], claims_of: Callable[[IPv4Network], tuple[Hashable, ...]]
    ) -> None:
        """Add to `dirty` every peer whose plan may depend on one in it: the members of its
        old group, the peers sharing an old or a new claim; and theirs, and so on."""
        todo = list(dirty)
        while todo:
            subnet = todo.pop()
            related: set[IPv4Network] = set()
            if isinstance(group := self._group.get(subnet), _Group):
                related.update(group.members)
            for claim in {*self._claims.get(subnet, ()), *claims_of(subnet)}:
                related.update(self._holders.get(claim, ()))
            for other in related - dirty:
                dirty.add(other)
                todo.append(other)

    def _components(self, subnets: set[IPv4Network]) -> list[list[IPv4Network]]:
        """`subnets` split into groups tied by shared claims (after `_set_claims`)."""
        seen: set[IPv4Network] = set()
        out = []
        for start in subnets:
            if start in seen:
                continue
            seen.add(start)
            members, todo = [start], [start]
            while todo:
                for claim in self._claims.get(todo.pop(), ()):
                    for other in self._holders[claim]:
                        if other not in seen:
                            seen.add(other)
                            members.append(other)
                            todo.append(other)
            out.append(members)
        return out

    # -- the bookkeeping --------------------------------------------------------------------
    def _set_claims(
        self,
        subnet: IPv4Network,
        planner: Planner,
        lease: Lease | None,
        claims: tuple[Hashable, ...],
    ) -> None:
        for claim in self._claims.pop(subnet, ()):
            holders = tuple(s for s in self._holders[claim] if s != subnet)
            if holders:
                self._holders[claim] = holders
            else:
                del self._holders[claim]
        if lease is None:
            self._leases.pop(subnet, None)
            return
        self._leases[subnet] = (lease, planner.inputs(lease))  # the lease, as the table has it
        if claims:
            self._claims[subnet] = claims
            for claim in claims:
                self._holders[claim] = (*self._holders.get(claim, ()), subnet)

    def _drop_group(self, subnet: IPv4Network, before: dict[tuple, Entry]) -> None:
        group = self._group.get(subnet)
        if group is None:
            return
        if isinstance(group, _Group):
            members, entries = group.members, group.entries
            self._warned.pop(members, None)
        else:
            members, entries = (subnet,), group
        for member in members:
            self._group.pop(member, None)
        for entry in entries:
            if self.desired.get(entry.slot) is entry:
                before.setdefault(entry.slot, self.desired.pop(entry.slot))

    def _plan_group(self, planner: Planner, peers: Mapping[IPv4Network, Lease]) -> list[tuple]:
        """Plan one group; the slots of its entries."""
        entries, warnings = planner.plan(peers)
        if len(peers) == 1 and not warnings:
            [subnet] = peers
            self._group[subnet] = tuple(entries)
        else:
            group = _Group(tuple(peers), tuple(entries), tuple(warnings))
            for subnet in group.members:
                self._group[subnet] = group
            if warnings:
                self._warned[group.members] = group.warnings
        for entry in entries:
            self.desired[entry.slot] = entry
        return [entry.slot for entry in entries]


class _Unset:
    """The context before the first update: equal to none."""
