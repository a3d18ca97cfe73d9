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
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Literal

from flanneld.core.lease import Lease, RecordError
from flanneld.core.subnets import subnet_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rejected:
    """Why a record under subnets/ is not used: the rule it breaks and a sentence."""

    rule: str
    why: str


@dataclass(frozen=True)
class Snapshot:
    leases: dict[IPv4Network, Lease]
    bad: dict[str, Rejected]  # key under subnets/ -> why it was skipped
    revision: int
    cluster_id: int = 0


@dataclass(frozen=True)
class WatchEvent:
    key: str
    subnet: IPv4Network | None
    lease: Lease | None  # None for a delete, or for a put whose record is malformed
    error: Rejected | None = None  # why a put was not understood
    revision: int = 0


@dataclass(frozen=True)
class Change:
    kind: Literal["added", "changed", "removed"]
    subnet: IPv4Network
    lease: Lease  # the new lease, or for "removed" the last one known


WARN_LIMIT = 20  # skipped records named one by one; beyond that, counted in one line
Check = Callable[[Lease], None]  # raises RecordError for a record that must not be used


class PeerTable:
    def __init__(self, check: Check | None = None) -> None:
        self.leases: dict[IPv4Network, Lease] = {}
        self.rejected: dict[str, Rejected] = {}  # the records skipped now, by key
        self.unconfirmed: set[IPv4Network] = set()  # kept after etcd lost its data
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
        level = logging.WARNING if len(self.rejected) <= WARN_LIMIT else logging.DEBUG
        log.log(level, "skipping lease record %s (%s): %s", key, rejected.rule, rejected.why)
        return True

    def reset(self, snap: Snapshot, keep_missing: bool = False) -> list[Change]:
        """Replace the table by a fresh listing and report every difference. With
        `keep_missing` (etcd lost its data), subnets the listing lacks stay, unconfirmed;
        so do those still unconfirmed from an earlier loss."""
        bad = dict(snap.bad)
        good: dict[IPv4Network, Lease] = {}
        for subnet, lease in snap.leases.items():
            key = subnet_key(subnet)
            if (why := self._judge(key, lease)) is not None:
                bad[key] = why
            else:
                good[subnet] = lease
        self.rejected = {k: v for k, v in self.rejected.items() if k in bad}
        new_bad = sum(self._reject(key, why) for key, why in bad.items())
        if len(self.rejected) > WARN_LIMIT and new_bad:
            log.warning(
                "%d lease records skipped in all (only the first %d named)",
                len(self.rejected),
                WARN_LIMIT,
            )
        changes: list[Change] = []
        for subnet, old in list(self.leases.items()):
            # a known subnet whose record turned bad keeps its last good record
            if subnet in good or subnet_key(subnet) in bad:
                continue
            if keep_missing or subnet in self.unconfirmed:
                self.unconfirmed.add(subnet)
                continue
            changes.append(Change("removed", subnet, old))
            del self.leases[subnet]
        for subnet, new in good.items():
            self.unconfirmed.discard(subnet)
            old = self.leases.get(subnet)
            if old is None:
                changes.append(Change("added", subnet, new))
            elif old.attrs != new.attrs:
                changes.append(Change("changed", subnet, new))
            self.leases[subnet] = new
        return changes

    def expire_unconfirmed(self) -> list[Change]:
        """The grace after a loss of etcd's data is over: drop what did not re-appear."""
        changes = [Change("removed", s, self.leases.pop(s)) for s in sorted(self.unconfirmed)]
        self.unconfirmed.clear()
        return changes

    def apply(self, ev: WatchEvent) -> list[Change]:
        if ev.lease is not None and (why := self._judge(ev.key, ev.lease)) is not None:
            ev = WatchEvent(ev.key, ev.subnet, None, why, ev.revision)
        if ev.error is not None:  # a put we cannot use: keep the last good record, if any
            self._reject(ev.key, ev.error)
            return []
        self.rejected.pop(ev.key, None)
        if ev.subnet is None:
            return []
        self.unconfirmed.discard(ev.subnet)
        if ev.lease is None:
            old = self.leases.pop(ev.subnet, None)
            return [Change("removed", ev.subnet, old)] if old else []
        old = self.leases.get(ev.subnet)
        self.leases[ev.subnet] = ev.lease
        if old is None:
            return [Change("added", ev.subnet, ev.lease)]
        if old.attrs != ev.lease.attrs:
            return [Change("changed", ev.subnet, ev.lease)]
        return []
