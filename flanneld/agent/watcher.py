"""Follows `<prefix>/subnets/`: snapshot, then watch from the snapshot's revision + 1.

On a broken stream it reconnects with back-off and re-lists; when the watch falls behind
a compaction it re-lists too. A re-list reports every difference to the table it had.
Changes go to one callback; the table itself is `PeerTable` (pure).

A re-list whose revision is below one already seen, or from another cluster ID, means etcd
lost its data (a wiped data dir, a restored backup), not that the peers left: the table keeps
the peers it knew while they register again, and drops those still missing after `grace`
seconds; `on_data_loss` tells the lease manager to put this node's lease back at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aetcd.exceptions import RevisionCompactedError

from flanneld.core.backoff import Backoff, Outage
from flanneld.core.peers import Change, Check, PeerTable
from flanneld.edges.registry import EtcdRegistry

log = logging.getLogger(__name__)


class PeerWatcher:
    def __init__(
        self,
        registry: EtcdRegistry,
        on_change: Callable[[list[Change]], None],
        on_recover: Callable[[], None] | None = None,
        check: Check | None = None,
        on_data_loss: Callable[[], None] | None = None,
        grace: float = 3600.0,
    ) -> None:
        self.registry = registry
        self.on_change = on_change
        self.on_recover = on_recover  # called when etcd answers again after an outage
        self.on_data_loss = on_data_loss
        self.grace = grace
        self.table = PeerTable(check)
        self.revision: int | None = None  # last revision applied; None: re-list first
        self.seen = 0  # the highest revision seen from this etcd cluster
        self.cluster_id: int | None = None
        self.synced = asyncio.Event()
        self.resyncs = 0
        self.reconnects = 0  # broken streams, for metrics
        self.data_losses = 0
        self._expiry: asyncio.TimerHandle | None = None

    async def resync(self) -> None:
        snap = await self.registry.snapshot()
        lost = snap.revision < self.seen or self.cluster_id not in (None, snap.cluster_id)
        if lost:
            self.data_losses += 1
            log.warning(
                "etcd lost its data (revision %d, %d seen before; cluster ID %x, was %x): "
                "keeping the %d leases known until they register again, at most %.0f s",
                snap.revision,
                self.seen,
                snap.cluster_id,
                self.cluster_id or 0,
                len(self.table.leases),
                self.grace,
            )
            if self._expiry is not None:
                self._expiry.cancel()
            self._expiry = asyncio.get_running_loop().call_later(self.grace, self._expire)
        changes = self.table.reset(snap, keep_missing=lost)
        self.revision = self.seen = snap.revision
        self.cluster_id = snap.cluster_id
        self.resyncs += 1
        self.synced.set()
        if changes:
            self.on_change(changes)
        if lost and self.on_data_loss is not None:
            self.on_data_loss()

    def _expire(self) -> None:
        self._expiry = None
        gone = self.table.expire_unconfirmed()
        for ch in gone:
            log.info("lease %s did not register again after etcd lost its data", ch.subnet)
        if gone:
            self.on_change(gone)

    async def follow(self) -> None:
        """Apply watch events from `self.revision + 1` until the stream ends or fails."""
        assert self.revision is not None
        async for ev in self.registry.watch(self.revision + 1):
            changes = self.table.apply(ev)
            self.revision = max(self.revision, ev.revision)
            self.seen = max(self.seen, self.revision)
            if changes:
                self.on_change(changes)

    async def run(self) -> None:
        backoff, outage = Backoff(), Outage(log, "etcd watch")
        while True:
            try:
                if self.revision is None:
                    await self.resync()
                    if outage.down and self.on_recover is not None:
                        self.on_recover()
                    outage.ok()
                    backoff.reset()
                await self.follow()
            except RevisionCompactedError as e:
                log.info("watch fell behind a compaction (%s); re-listing leases", e)
                self.revision = None
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any stream failure: back off and resume
                # (the registry has dropped the stream's connection already)
                outage.failed(e)
                self.reconnects += 1
                self.revision = None  # re-list on recovery: it reports whatever was missed
            await backoff.sleep()
