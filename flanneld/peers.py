"""The table of leases under `<prefix>/subnets/`, kept from a snapshot plus watch events.

Pure: it turns snapshots and events into changes. Fixes the reference's three faults here: a
malformed record is skipped with a warning (it never empties the table), a resync reports
records that changed while the watch was behind, and nothing is inferred from an empty event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Literal

from .lease import Lease
from .registry import Snapshot, WatchEvent
from .subnets import subnet_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    kind: Literal["added", "changed", "removed"]
    subnet: IPv4Network
    lease: Lease  # the new lease, or for "removed" the last one known


WARN_LIMIT = 20  # malformed records named one by one; beyond that, counted in one line


class PeerTable:
    def __init__(self) -> None:
        self.leases: dict[IPv4Network, Lease] = {}
        self._warned: dict[str, str] = {}

    def _warn_bad(self, key: str, why: str) -> bool:
        """Warn once per key and problem (quietly past WARN_LIMIT keys); True if it is new."""
        if self._warned.get(key) == why:
            return False
        self._warned[key] = why
        if len(self._warned) <= WARN_LIMIT:
            log.warning("skipping malformed lease record %s: %s", key, why)
        else:
            log.debug("skipping malformed lease record %s: %s", key, why)
        return True

    def reset(self, snap: Snapshot) -> list[Change]:
        """Replace the table by a fresh listing and report every difference."""
        new_bad = sum(self._warn_bad(key, why) for key, why in snap.bad.items())
        if len(self._warned) > WARN_LIMIT and new_bad:
            log.warning(
                "%d malformed lease records skipped in all (only the first %d named)",
                len(self._warned),
                WARN_LIMIT,
            )
        self._warned = {k: v for k, v in self._warned.items() if k in snap.bad}
        changes: list[Change] = []
        for subnet, old in list(self.leases.items()):
            # a known subnet whose record turned malformed keeps its last good record
            if subnet not in snap.leases and subnet_key(subnet) not in snap.bad:
                changes.append(Change("removed", subnet, old))
                del self.leases[subnet]
        for subnet, new in snap.leases.items():
            old = self.leases.get(subnet)
            if old is None:
                changes.append(Change("added", subnet, new))
            elif old.attrs != new.attrs:
                changes.append(Change("changed", subnet, new))
            self.leases[subnet] = new
        return changes

    def apply(self, ev: WatchEvent) -> list[Change]:
        if ev.subnet is None:
            if ev.lease is None and ev.error:
                self._warn_bad(ev.key, ev.error)
            return []
        if ev.lease is None:
            if ev.error:  # a put we cannot read: keep the last good record, if any
                self._warn_bad(ev.key, ev.error)
                return []
            old = self.leases.pop(ev.subnet, None)
            return [Change("removed", ev.subnet, old)] if old else []
        self._warned.pop(ev.key, None)
        old = self.leases.get(ev.subnet)
        self.leases[ev.subnet] = ev.lease
        if old is None:
            return [Change("added", ev.subnet, ev.lease)]
        if old.attrs != ev.lease.attrs:
            return [Change("changed", ev.subnet, ev.lease)]
        return []
