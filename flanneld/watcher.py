"""Follows `<prefix>/subnets/`: snapshot, then watch from the snapshot's revision + 1.

On a broken stream it reconnects with back-off and re-lists; when the watch falls behind
a compaction it re-lists too. A re-list reports every difference to the table it had.
Changes go to one callback; the table itself is `PeerTable` (pure).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aetcd.exceptions import RevisionCompactedError

from .backoff import Backoff, Outage
from .peers import Change, PeerTable
from .registry import EtcdRegistry

log = logging.getLogger(__name__)


class PeerWatcher:
    def __init__(
        self,
        registry: EtcdRegistry,
        on_change: Callable[[list[Change]], None],
        on_recover: Callable[[], None] | None = None,
    ) -> None:
        self.registry = registry
        self.on_change = on_change
        self.on_recover = on_recover  # called when etcd answers again after an outage
        self.table = PeerTable()
        self.revision: int | None = None  # last revision applied; None: re-list first
        self.synced = asyncio.Event()
        self.resyncs = 0
        self.reconnects = 0  # broken streams, for metrics

    async def resync(self) -> None:
        snap = await self.registry.snapshot()
        changes = self.table.reset(snap)
        self.revision = snap.revision
        self.resyncs += 1
        self.synced.set()
        if changes:
            self.on_change(changes)

    async def follow(self) -> None:
        """Apply watch events from `self.revision + 1` until the stream ends or fails."""
        assert self.revision is not None
        async for ev in self.registry.watch(self.revision + 1):
            changes = self.table.apply(ev)
            self.revision = max(self.revision, ev.revision)
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
                outage.failed(e)
                self.reconnects += 1
                self.revision = None  # re-list on recovery: it reports whatever was missed
                await self.registry.fail_over()
            await backoff.sleep()
