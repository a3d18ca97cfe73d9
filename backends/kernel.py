"""The reconcile skeleton of backends whose state is kernel entries (host-gw, vxlan).

A pass: bring the plan up to the peers (pure, in the backend; kept from pass to pass by
`PlanCache`, which re-plans only the peers that changed), take what the backend owns (a fresh
dump on full passes, its `KernelView` in between), diff (on a full pass all of it, after a peer
event only the slots whose plan changed and those that failed to apply), apply, log one line per
entry changed. `inspect` answers the status command: which desired entries are missing, by peer.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Network

from pyroute2.iproute.linux import AsyncIPRoute

from flanneld.core.lease import Lease

from . import netlink
from .base import Backend, BackendContext, ReconcileResult
from .plancache import PlanCache, Planner
from .reconcile import Entry, KernelView, Route, diff, missing_by_peer
from .rtnl import NEXTHOP_MIN, Known, Rtnl, delete_nexthop, nexthop_id

log = logging.getLogger(__name__)


class KernelBackend(Backend):
    """`netns` targets a named namespace (tests); the agent runs inside its own and omits it."""

    def __init__(self, ctx: BackendContext, netns: str | None = None) -> None:
        super().__init__(ctx)
        self._netns = netns
        self._ipr: AsyncIPRoute | None = None  # links and addresses (pyroute2)
        self._rtnl: Rtnl | None = None  # the entries by the thousand (backends.rtnl)
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()  # warnings of the last pass: each is logged when it appears
        self._plans = PlanCache()  # the plan, by slot: a member added again was deleted by hand
        self._view = KernelView()  # owned entries: dumped on full passes, followed in between
        self._retry: set[tuple] = set()  # slots whose last change failed: diffed again

    def _socket(self) -> AsyncIPRoute:
        if self._ipr is None:
            self._ipr = netlink.open_ipr(self._netns)
        return self._ipr

    def _lean(self) -> Rtnl:
        if self._rtnl is None:
            self._rtnl = Rtnl(self._netns)
        return self._rtnl

    # -- what a backend provides ----------------------------------------------------------
    @abstractmethod
    async def _planner(
        self, ipr: AsyncIPRoute, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool
    ) -> Planner:
        """How to plan the desired entries (and one warning per peer skipped) now; `full`: a
        full pass, where whatever the plan reads from the kernel is read afresh."""

    @abstractmethod
    async def _dump(self, rtnl: Rtnl, known: Known) -> set[Entry]:
        """Every entry the backend owns in the kernel now (those equal to one in `known`, by
        ident, as that object)."""

    async def _before_pass(self, ipr: AsyncIPRoute, lease: Lease) -> None:  # noqa: B027
        """Bring up what the entries hang on (vxlan: its device); default: nothing."""

    def _describe(self, entry: Entry) -> str:
        if isinstance(entry, Route):
            return f"{entry.dst} via {entry.gateway} dev #{entry.oif}"
        return repr(entry)

    # -- the skeleton -----------------------------------------------------------------------
    async def reconcile(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool = True
    ) -> ReconcileResult:
        async with self._lock:
            ipr = self._socket()
            try:
                await self._before_pass(ipr, lease)
                full = full or not self._view.known
                planner = await self._planner(ipr, lease, peers, full)
                update = self._plans.update(planner, peers)
                desired = self._plans.desired
                if full:
                    known = {e.ident: e for e in desired.values()}
                    self._view.refresh(await self._dump(self._lean(), known))
                    change = diff(desired.values(), self._view.entries())
                else:
                    slots = update.slots | self._retry
                    want = [desired[s] for s in slots if s in desired]
                    change = diff(want, [e for s in slots if (e := self._view.get(s)) is not None])
                was = {e.slot: w for e in change.upsert if (w := self._view.get(e.slot))}
                result = ReconcileResult()
                rtnl = self._lean()
                rtnl.nexthops = len(peers) >= NEXTHOP_MIN
                done = await netlink.apply(rtnl, change, result)
                self._view.applied(done.upserted, [*done.removed, *done.gone])
                self._retry = {e.slot for e in done.failed}
                if full:
                    await self._drop_orphan_hops(rtnl, desired.values())
            except Exception:
                await self.close()  # a broken socket: the next pass opens a fresh one
                raise
        warnings = self._plans.warnings()
        for warning in warnings:
            if warning not in self._warned:
                log.warning("%s", warning)
        self._warned = set(warnings)

        def planned_before(entry: Entry) -> bool:
            slot = entry.slot
            prev = update.before.get(slot) if slot in update.slots else desired.get(slot)
            return prev == entry

        done.report_slots(was, planned_before, result, self._describe)
        return result

    async def _drop_orphan_hops(self, rtnl: Rtnl, desired: Iterable[Entry]) -> None:
        """Delete our nexthop objects that no route goes through and no planned route wants.
        A route deleted by hand whose peer then left before an event pass saw the route leaves
        one behind: no delete of that route comes to take it along."""
        unused = rtnl.our_hops - rtnl.used_hops  # nearly always none: then no more work
        if unused and rtnl.nexthops:  # else no route is made through one: none is wanted
            unused -= {nexthop_id(e) for e in desired if isinstance(e, Route)}
        if orphans := sorted(unused):
            codes = await rtnl.run(delete_nexthop(nhid) for nhid in orphans)
            log.info("removed %d nexthop objects no route used", codes.count(0))

    async def inspect(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease]
    ) -> dict[IPv4Network, list[str]]:
        """For each peer, the desired kernel entries that are missing now (read-only)."""
        async with self._lock:
            ipr = self._socket()
            try:
                desired, _ = (await self._planner(ipr, lease, peers, True)).plan(peers)
                actual = await self._dump(self._lean(), {})
            except Exception:
                await self.close()
                raise
        missing = missing_by_peer(desired, actual, peers)
        return {s: [self._describe(e) for e in entries] for s, entries in missing.items()}

    async def close(self) -> None:
        self._view.invalidate()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None
