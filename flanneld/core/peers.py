"""The table of leases under `<prefix>/subnets/`, kept from a snapshot plus watch events.

Pure: it turns snapshots and events into changes. Fixes the reference's three faults here: a
malformed record is skipped with a warning (it never empties the table), a resync reports
records that changed while the watch was behind, and nothing is inferred from an empty event.
A record that breaks a rule (`admission.PeerRules`) is skipped like a malformed one, and a
subnet whose record turns bad keeps its last good record. After etcd lost its data, the
subnets it no longer lists are kept, "unconfirmed", until they re-appear or a grace period
ends (`keep_missing`, `expire_unconfirmed`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv6Network
from typing import Any, Literal

from flanneld.core.lease import Lease, RecordError
from flanneld.core.subnets import Network

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejected:
    """Why a record under subnets/ is not used: the rule it breaks and a sentence."""

    rule: str
    why: str


@dataclass(frozen=True)
class Snapshot:
    leases: dict[str, Lease]  # by key under subnets/
    bad: dict[str, Rejected]  # key under subnets/ -> why it was skipped
    revision: int
    cluster_id: int = 0


@dataclass(frozen=True)
class WatchEvent:
    key: str
    subnet: Network | None  # the lease's ident (`Lease.ident`) named by the key
    lease: Lease | None  # None for a delete, or for a put whose record is malformed
    error: Rejected | None = None  # why a put was not understood
    revision: int = 0


@dataclass(frozen=True)
class Change:
    kind: Literal["added", "changed", "removed"]
    subnet: Network  # the lease's ident: its IPv4 subnet, or an IPv6-only lease's IPv6 one
    lease: Lease  # the new lease, or for "removed" the last one known


def _spaces(lease: Lease) -> tuple[Network, ...]:
    """The address space a lease claims: its IPv4 subnet (none for an IPv6-only lease) and
    its IPv6 subnet, if any."""
    v4 = (lease.subnet,) if lease.has_ipv4 else ()
    return v4 + ((lease.ipv6_subnet,) if lease.ipv6_subnet is not None else ())


WARN_LIMIT = 20  # skipped records named one by one; beyond that, counted in one line
Check = Callable[[Lease], None]  # raises RecordError for a record that must not be used


class PeerTable:
    def __init__(self, check: Check | None = None, quiet: bool = False) -> None:
        self.quiet = quiet  # no log lines (flannelctl lists the rejections itself)
        self.leases: dict[Network, Lease] = {}  # by `Lease.ident`
        self.rejected: dict[str, Rejected] = {}  # the records skipped now, by key
        self.unconfirmed: set[Network] = set()  # kept after etcd lost its data
        self._by_v6: dict[IPv6Network, Lease] = {}  # the leases by IPv6 subnet
        self._check = check

    def rejected_by_rule(self) -> Counter[str]:
        return Counter(r.rule for r in self.rejected.values())

    def _judge(self, key: str, lease: Lease) -> Rejected | None:
        if self._check is None:
            return None
        try:
            self._check(lease)
        except RecordError as e:
            return Rejected(e.rule, str(e))
        return None

    def _reject(self, key: str, rejected: Rejected) -> bool:
        """Note a skipped record; warn once per key and reason (quietly past WARN_LIMIT
        keys). True if it is new."""
        if self.rejected.get(key) == rejected:
            return False
        self.rejected[key] = rejected
        if self.quiet:
            return True
        level = logging.WARNING if len(self.rejected) <= WARN_LIMIT else logging.DEBUG
        log.log(level, "skipping lease record %s (%s): %s", key, rejected.rule, rejected.why)
        return True

    def _claimed(self, lease: Lease, holders: Mapping[Any, Lease]) -> Rejected | None:
        """Overlap with a record already in `holders` (by IPv4 and by IPv6 subnet): the one
        created first keeps the space (the create revision orders claims, then the key)."""
        for space in _spaces(lease):
            held = holders.get(space)
            if (
                held is not None
                and held.key != lease.key
                and (held.create_revision, held.key) <= (lease.create_revision, lease.key)
            ):
                return Rejected(
                    "overlap",
                    f"subnet {space} is already leased under key {held.key}, created earlier",
                )
        return None

    def _drop(self, subnet: Network) -> Lease:
        old = self.leases.pop(subnet)
        if old.ipv6_subnet is not None and self._by_v6.get(old.ipv6_subnet) is old:
            del self._by_v6[old.ipv6_subnet]
        return old

    def reset(self, snap: Snapshot, keep_missing: bool = False) -> list[Change]:
        """Replace the table by a fresh listing and report every difference. With
        `keep_missing` (etcd lost its data), subnets the listing lacks stay, unconfirmed;
        so do those still unconfirmed from an earlier loss."""
        bad = dict(snap.bad)
        good: dict[Network, Lease] = {}
        holders: dict[Any, Lease] = {}
        by_age = sorted(snap.leases.items(), key=lambda kv: (kv[1].create_revision, kv[0]))
        for key, lease in by_age:
            why = self._judge(key, lease) or self._claimed(lease, holders)
            if why is not None:
                bad[key] = why
                continue
            good[lease.ident] = lease
            for space in _spaces(lease):
                holders[space] = lease
        self.rejected = {k: v for k, v in self.rejected.items() if k in bad}
        new_bad = sum(self._reject(key, why) for key, why in bad.items())
        if len(self.rejected) > WARN_LIMIT and new_bad and not self.quiet:
            log.warning(
                "%d lease records skipped in all (only the first %d named)",
                len(self.rejected),
                WARN_LIMIT,
            )
        changes: list[Change] = []
        for subnet, old in list(self.leases.items()):
            # a known subnet whose record turned bad keeps its last good record
            if subnet in good or old.key in bad:
                continue
            if keep_missing or subnet in self.unconfirmed:
                self.unconfirmed.add(subnet)
                continue
            changes.append(Change("removed", subnet, self._drop(subnet)))
        for subnet, new in good.items():
            self.unconfirmed.discard(subnet)
            changes += self._put(subnet, new)
        return changes

    def _put(self, subnet: Network, new: Lease) -> list[Change]:
        old = self.leases.get(subnet)
        if old is not None:
            self._drop(subnet)
        self.leases[subnet] = new
        if new.ipv6_subnet is not None:
            self._by_v6[new.ipv6_subnet] = new
        if old is None:
            return [Change("added", subnet, new)]
        if old.attrs != new.attrs or old.ipv6_subnet != new.ipv6_subnet:
            return [Change("changed", subnet, new)]
        return []

    def expire_unconfirmed(self) -> list[Change]:
        """The grace after a loss of etcd's data is over: drop what did not re-appear."""
        changes = [Change("removed", s, self._drop(s)) for s in sorted(self.unconfirmed)]
        self.unconfirmed.clear()
        return changes

    def apply(self, ev: WatchEvent) -> list[Change]:
        if ev.lease is not None:
            # the records already holding its space: its IPv4 subnet's, its IPv6 subnet's
            # unless that is the same subnet's record (O(1): this runs for every watch event)
            holders: dict[Any, Lease] = {}
            if ev.lease.has_ipv4 and (held := self.leases.get(ev.lease.subnet)) is not None:
                holders[ev.lease.subnet] = held
            v6 = ev.lease.ipv6_subnet
            if v6 is not None and (held6 := self._by_v6.get(v6)) and held6.ident != ev.subnet:
                holders[v6] = held6
            why = self._judge(ev.key, ev.lease) or self._claimed(ev.lease, holders)
            if why is not None:
                ev = WatchEvent(ev.key, ev.subnet, None, why, ev.revision)
        if ev.error is not None:  # a put we cannot use: keep the last good record, if any
            self._reject(ev.key, ev.error)
            return []
        self.rejected.pop(ev.key, None)
        if ev.subnet is None:
            return []
        old = self.leases.get(ev.subnet)
        if ev.lease is None:  # a delete counts only for the key the record came from
            if old is None or old.key != ev.key:
                return []
            self.unconfirmed.discard(ev.subnet)
            return [Change("removed", ev.subnet, self._drop(ev.subnet))]
        self.unconfirmed.discard(ev.subnet)
        if old is not None and old.key != ev.key:  # an older claim lost to this one
            self._reject(old.key, Rejected("overlap", f"replaced by the older {ev.key}"))
        return self._put(ev.subnet, ev.lease)
