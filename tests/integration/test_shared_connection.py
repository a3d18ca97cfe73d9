"""Tasks share the registry's etcd connection. When one of them sees a failure and drops the
connection, the calls the others have in flight on it must end with their own answer, not
with the CancelledError a closed gRPC channel raises into them (which ends a TaskGroup task
silently: the CI run where one agent's peer watch stopped for good after an etcd outage)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network

from flanneld.agent.watcher import PeerWatcher
from flanneld.core.lease import LeaseAttrs
from flanneld.edges.registry import EtcdRegistry


async def test_calls_in_flight_outlive_another_callers_fail_over(etcd_server, etcd_prefix):
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    try:
        attrs = LeaseAttrs(IPv4Address("192.0.2.11"), "host-gw", {"pad": "x" * 3000})
        for i in range(300):  # a listing big enough to be in flight for a few milliseconds
            await reg.reserve(IPv4Network(f"10.{i // 250}.{i % 250}.0/24"), attrs)
        outcomes = []
        for delay in (0, 0.0005, 0.001, 0.002, 0.004, 0.008) * 3:
            listing = asyncio.create_task(reg.snapshot())
            await asyncio.sleep(delay)
            await reg.fail_over()  # another caller's failure drops the shared connection
            try:
                outcomes.append(len((await listing).leases))
            except asyncio.CancelledError:
                outcomes.append("cancelled")
        assert outcomes == [300] * len(outcomes)
    finally:
        await reg.close()


async def test_the_peer_watch_survives_others_dropping_its_connection(etcd_server, etcd_prefix):
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    watcher = PeerWatcher(reg, lambda changes: None)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.synced.wait(), 10)
        attrs = LeaseAttrs(IPv4Address("192.0.2.12"), "host-gw")
        for i in range(20):
            await reg.reserve(IPv4Network(f"10.9.{i}.0/24"), attrs)
            await reg.fail_over()  # the connection the watch streams on, dropped by another
            await asyncio.sleep(0.05)

        async def all_seen():
            while len(watcher.table.leases) < 20:
                assert not task.done(), task
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_seen(), 20)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reg.close()
