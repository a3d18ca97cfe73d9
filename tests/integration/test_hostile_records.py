"""Hostile lease records and a wiped etcd, against a real etcd server (issue 12, items 1, 2
and 9): what any writer under `<prefix>/subnets/` can put there must cost only that record."""

from __future__ import annotations

import asyncio
import shutil
from ipaddress import IPv4Address, IPv4Network

from flanneld.agent.leasemgr import LeaseManager
from flanneld.agent.watcher import PeerWatcher
from flanneld.core.admission import PeerRules
from flanneld.core.config import parse_config
from flanneld.core.lease import LeaseAttrs
from flanneld.edges.registry import EtcdRegistry

from ..conftest import EtcdServer

CFG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
RULES = PeerRules(CFG, IPv4Address("192.0.2.10"))
A, B, C = (IPv4Network(f"10.5.{i}.0/24") for i in (1, 2, 3))


def attrs(last: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.0.2.{last}"), "host-gw")


async def until(cond, seconds: float = 5.0) -> None:
    for _ in range(int(seconds * 20)):
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def test_nested_record_costs_only_itself_and_the_watch_goes_on(etcd_server, etcd_prefix):
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    await reg.create_lease(A, attrs(21), 60)
    nested = '{"PublicIP":"192.0.2.22","BackendData":' + "[" * 2000 + "]" * 2000 + "}"
    etcd_server.etcdctl("put", reg.key(B).decode(), nested)
    w = PeerWatcher(reg, lambda changes: None, check=RULES.check)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(w.synced.wait(), 5)
        assert set(w.table.leases) == {A}
        assert w.table.rejected["10.5.2.0-24"].rule == "malformed"
        etcd_server.etcdctl("put", reg.key(A).decode(), nested)  # a bad update of a good peer
        await reg.create_lease(C, attrs(23), 60)  # ...and the watch still applies what follows
        await until(lambda: C in w.table.leases)
        assert w.table.leases[A].attrs == attrs(21)  # the last good record stays
        assert w.resyncs == 1 and w.reconnects == 0
    finally:
        task.cancel()
        await reg.close()


async def test_non_canonical_and_dual_stack_keys_cannot_stand_in_for_a_peer(
    etcd_server, etcd_prefix
):
    reg = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    await reg.create_lease(A, attrs(21), 60)
    prefix = reg.subnets_prefix.decode()
    w = PeerWatcher(reg, lambda changes: None, check=RULES.check)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(w.synced.wait(), 5)
        aliases = ["10.5.1.0-024", "10.5.1.0-24&fd00::-64"]
        for alias in aliases:
            etcd_server.etcdctl("put", prefix + alias, attrs(66).encode().decode())
        await until(lambda: len(w.table.rejected) == 2)
        for alias in aliases:
            etcd_server.etcdctl("del", prefix + alias)
        await reg.create_lease(C, attrs(23), 60)
        await until(lambda: C in w.table.leases)
        assert w.table.leases[A].attrs == attrs(21)  # neither alias replaced nor removed it
        assert {r.rule for r in w.table.rejected.values()} <= {"key"}
    finally:
        task.cancel()
        await reg.close()


async def test_a_wiped_etcd_keeps_every_peer_and_gets_our_lease_back(etcd_prefix):
    server = EtcdServer()
    server.start()
    reg = EtcdRegistry([server.endpoint], etcd_prefix)
    seen = []
    try:
        lm = LeaseManager(reg, attrs(10), CFG)
        own = await lm.acquire()
        for net, last in ((A, 21), (B, 22)):
            if net != own.subnet:
                await reg.create_lease(net, attrs(last), 60)
        for i in range(30):  # history, as any etcd in use has
            await reg.call(lambda c, i=i: c.put(f"{etcd_prefix}/other".encode(), str(i).encode()))
        w = PeerWatcher(
            reg, seen.extend, lm.renew_now, RULES.check, lm.etcd_lost_data, grace=1.5
        )
        tasks = [asyncio.create_task(w.run()), asyncio.create_task(lm.maintain())]
        await asyncio.wait_for(w.synced.wait(), 5)
        known = set(w.table.leases)
        assert len(known) == 3

        server.stop()  # the data dir lost; an operator starts etcd again, empty
        shutil.rmtree(f"{server.dir}/data")
        server.start()
        await until(lambda: w.data_losses == 1, 15)
        assert not [ch for ch in seen if ch.kind == "removed"]  # no peer dropped meanwhile
        # our lease is written again at once, with the same subnet
        for _ in range(100):
            got = await reg.get_lease(own.subnet)
            if got is not None:
                break
            await asyncio.sleep(0.05)
        assert got is not None and got.attrs == attrs(10)
        # one peer registers again; the other does not and goes when the grace is over
        back = next(n for n in known if n != own.subnet)
        await reg.create_lease(back, attrs(21 if back == A else 22), 60)
        gone = (known - {own.subnet, back}).pop()
        await until(lambda: gone not in w.table.leases, 5)
        assert set(w.table.leases) == {own.subnet, back}
        assert [(ch.kind, ch.subnet) for ch in seen if ch.kind == "removed"] == [("removed", gone)]
        for t in tasks:
            t.cancel()
    finally:
        await reg.close()
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
