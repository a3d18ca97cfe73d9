"""This node's lease: acquire, keep alive before expiry, and re-acquire when it is lost.

Acquisition lists the leases, lets `allocation.choose_subnet` decide, and claims the choice
with a create-if-absent transaction, choosing again after a lost race. Renewal is an etcd
keep-alive of the same etcd lease (no new Put, so peers see no churn); a reservation (a key
without an etcd lease) is used as is and never gets a TTL. If the key disappears, the agent
takes a lease again (the same subnet when still free) instead of exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from ipaddress import IPv4Network, IPv6Network

from flanneld.core.allocation import OutOfSubnets, choose_subnet
from flanneld.core.backoff import Backoff
from flanneld.core.config import NO_IPV4, NetworkConfig
from flanneld.core.lease import Lease, LeaseAttrs
from flanneld.core.peers import Change
from flanneld.edges.registry import EtcdRegistry

log = logging.getLogger(__name__)

LEASE_TTL = 24 * 3600


class LeaseManager:
    def __init__(
        self,
        registry: EtcdRegistry,
        attrs: LeaseAttrs,
        config: NetworkConfig,
        previous: IPv4Network | None = None,
        ttl: int = LEASE_TTL,
        renew_margin: int = 3600,
        rng: random.Random | None = None,
        on_lease: Callable[[Lease], None] | None = None,
        previous6: IPv6Network | None = None,
    ) -> None:
        self.registry = registry
        self.attrs = attrs
        self.config = config
        self.previous, self.previous6 = previous, previous6
        self.ttl = ttl
        self.renew_margin = min(renew_margin, ttl - 1)
        self.rng = rng or random.Random()
        self.on_lease = on_lease
        self.lease: Lease | None = None
        self.expires_at: float | None = None  # monotonic; None for a reservation
        self.renewals = 0
        self.renew_failures = 0
        self._lost = asyncio.Event()
        self._renew_now = asyncio.Event()

    async def acquire(self) -> Lease:
        """Take a lease; retry lost races. Raises OutOfSubnets when the range is full."""
        while True:
            snap = await self.registry.snapshot()
            choice = choose_subnet(
                self.config,
                snap.leases.values(),
                self.attrs.node_ip,
                self.previous,
                self.rng,
                self.previous6,
            )
            if choice.existing is not None:
                lease = await self._adopt(choice.existing)
                if lease is not None:
                    return self._took(lease, "reusing")
                continue
            for stale in choice.stale:
                log.info(
                    "deleting this node's lease %s: it no longer fits the config", stale.key
                )
                await self.registry.delete_lease(stale)
            lease = await self.registry.create_lease(
                choice.subnet, self.attrs, self.ttl, choice.subnet6
            )
            if lease is not None:
                self.expires_at = time.monotonic() + self.ttl
                return self._took(lease, "acquired")
            log.info(
                "subnet %s was taken by another node meanwhile; choosing again",
                choice.subnet6 if choice.subnet == NO_IPV4 else choice.subnet,
            )

    async def _adopt(self, existing: Lease) -> Lease | None:
        """Keep using our own lease or reservation; None if its etcd lease just expired."""
        lease = existing
        if not existing.is_reservation:
            ttl = await self.registry.keepalive(existing.etcd_lease)
            if ttl <= 0:
                return None
            self.expires_at = time.monotonic() + ttl
        else:
            self.expires_at = None
        if existing.attrs != self.attrs:
            lease = await self.registry.update_lease(existing, self.attrs)
        return lease

    def _took(self, lease: Lease, how: str) -> Lease:
        kind = "reservation" if lease.is_reservation else "lease"
        log.info("%s %s %s for %s", how, kind, lease.key, lease.attrs.node_ip)
        changed = self.lease is None or self.lease.key != lease.key
        self.lease = lease
        self.previous = lease.subnet if lease.has_ipv4 else self.previous
        self.previous6 = lease.ipv6_subnet or self.previous6
        self._lost.clear()
        if self.on_lease is not None and changed:
            self.on_lease(lease)
        return lease

    def notice(self, changes: list[Change]) -> None:
        """Peer-watch changes: spot our own key being deleted, taken over or rewritten under
        another etcd lease (made a reservation, say): take it again, which adopts what is
        there (renewal, expiry and attributes with it)."""
        if self.lease is None:
            return
        for ch in changes:
            if ch.subnet != self.lease.ident:
                continue
            if ch.kind == "removed" or ch.lease.attrs.node_ip != self.attrs.node_ip:
                how = "deleted" if ch.kind == "removed" else "taken over"
            elif ch.lease.etcd_lease != self.lease.etcd_lease:
                how = "rewritten"
            else:
                continue
            log.warning("lease %s was %s in etcd; taking a lease again", ch.subnet, how)
            self._lost.set()

    def etcd_lost_data(self) -> None:
        """etcd came back without its data: put this node's lease back at once (the same
        subnet: it is free in an empty etcd), before peers take it for a free one."""
        if self.lease is not None:
            log.warning("etcd lost its data; writing lease %s again", self.lease.key)
            self._lost.set()

    def renew_now(self) -> None:
        """Renew at once (etcd is back after an outage: make sure the lease is still alive)."""
        self._renew_now.set()

    def renew_delay(self) -> float | None:
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - self.renew_margin - time.monotonic())

    async def _wait_lost(self, timeout: float | None) -> bool:
        """Sleep until renewal is due, the lease is lost (True) or a renewal is asked for."""
        waits = [
            asyncio.ensure_future(self._lost.wait()),
            asyncio.ensure_future(self._renew_now.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self._renew_now.clear()
        return self._lost.is_set()

    async def maintain(self) -> None:
        """Renew before expiry, retrying on failure; re-acquire when the lease is lost."""
        failures = Backoff(1.0, 60.0)
        while True:
            if self.lease is None or await self._wait_lost(self.renew_delay()):
                await self._reacquire()
                continue
            if self.lease.is_reservation:
                continue  # nothing to renew: it has no TTL
            try:
                ttl = await self.registry.keepalive(self.lease.etcd_lease)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - etcd trouble: retry well before expiry
                self.renew_failures += 1
                left = (self.expires_at or 0) - time.monotonic()
                retry = min(failures.next(), max(1.0, left / 10))
                log.warning(
                    "renewing lease %s failed (%s); retrying in %.0f s", self.lease.key, e, retry
                )
                await self._wait_lost(retry)
                continue
            if ttl <= 0:
                log.warning("lease %s expired in etcd; taking a lease again", self.lease.key)
                self._lost.set()
                continue
            self.renewals += 1
            failures.reset()
            self.expires_at = time.monotonic() + ttl
            log.info("renewed lease %s for %d s", self.lease.key, ttl)

    async def take(self) -> Lease:
        """Acquire, retrying with back-off until it works (etcd down, the range full)."""
        backoff = Backoff(1.0, 30.0)
        while True:
            try:
                return await self.acquire()
            except asyncio.CancelledError:
                raise
            except OutOfSubnets as e:
                log.error("%s", e)
            except Exception as e:  # noqa: BLE001 - etcd down: keep trying, bounded back-off
                log.warning("taking a lease failed (%s); retrying in %.0f s", e, backoff.delay)
            await backoff.sleep()

    async def _reacquire(self) -> None:
        old = self.lease
        if old is not None and not old.is_reservation:
            # Its key is gone: release the etcd lease now rather than let it linger for 24 h.
            with contextlib.suppress(Exception):
                await self.registry.revoke(old.etcd_lease)
        await self.take()
