"""The lease manager and the peer watcher against a real etcd server."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest
from aetcd.exceptions import RevisionCompactedError

from flanneld.agent.leasemgr import LeaseManager
from flanneld.agent.watcher import PeerWatcher
from flanneld.core.allocation import OutOfSubnets
from flanneld.core.config import parse_config
from flanneld.core.lease import LeaseAttrs
from flanneld.edges.registry import EtcdRegistry

ROOT = Path(__file__).resolve().parents[2]
CFG = parse_config('{"Network":"10.5.0.0/16","Backend":{"Type":"host-gw"}}')
ME = IPv4Address("192.0.2.11")


def attrs(ip=ME):
    return LeaseAttrs(ip, "host-gw")


@pytest.fixture
async def reg(etcd_server, etcd_prefix):
    r = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    yield r
    await r.close()


async def test_acquire_writes_reference_record_with_24h_ttl(reg, etcd_server):
    lm = LeaseManager(reg, attrs(), CFG)
    lease = await lm.acquire()
    assert CFG.contains_lease(lease.subnet)
    raw = etcd_server.etcdctl("get", "--print-value-only", reg.key(lease.subnet).decode())
    assert raw.strip() == '{"PublicIP":"192.0.2.11","PublicIPv6":null,"BackendType":"host-gw"}'
    ttl = await reg.time_to_live(lease.etcd_lease)
    assert 86000 < ttl <= 86400


async def test_reuse_after_restart_keeps_subnet_and_etcd_lease(reg):
    first = await LeaseManager(reg, attrs(), CFG).acquire()
    again = await LeaseManager(reg, attrs(), CFG, previous=IPv4Network("10.5.99.0/24")).acquire()
    assert again.subnet == first.subnet
    assert again.etcd_lease == first.etcd_lease
    snap = await reg.snapshot()
    assert [lease.subnet for lease in snap.leases.values()] == [first.subnet]


async def test_reuse_with_new_backend_data_rewrites_record(reg):
    first = await LeaseManager(reg, attrs(), CFG).acquire()
    new = LeaseAttrs(ME, "host-gw", {"x": 1})
    again = await LeaseManager(reg, new, CFG).acquire()
    assert again.subnet == first.subnet and again.etcd_lease == first.etcd_lease
    assert (await reg.get_lease(first.subnet)).attrs == new


async def test_reuse_from_subnet_env(reg):
    prev = IPv4Network("10.5.42.0/24")
    lease = await LeaseManager(reg, attrs(), CFG, previous=prev).acquire()
    assert lease.subnet == prev


async def test_previous_subnet_taken_by_other_node_is_not_stolen(reg):
    prev = IPv4Network("10.5.42.0/24")
    await reg.create_lease(prev, attrs(IPv4Address("192.0.2.99")), 60)
    lease = await LeaseManager(reg, attrs(), CFG, previous=prev).acquire()
    assert lease.subnet != prev


async def test_reservation_is_used_and_stays_a_reservation(reg, etcd_server):
    res = IPv4Network("10.5.77.0/24")
    etcd_server.etcdctl("put", reg.key(res).decode(), attrs().encode().decode())
    lm = LeaseManager(reg, attrs(), CFG, ttl=3, renew_margin=1)
    lease = await lm.acquire()
    assert lease.subnet == res and lease.is_reservation
    task = asyncio.create_task(lm.maintain())
    await asyncio.sleep(3.5)  # longer than the TTL a lease would get
    task.cancel()
    kept = await reg.get_lease(res)
    assert kept is not None and kept.etcd_lease == 0


async def test_renew_keeps_key_past_ttl(reg):
    lm = LeaseManager(reg, attrs(), CFG, ttl=3, renew_margin=2)
    lease = await lm.acquire()
    task = asyncio.create_task(lm.maintain())
    await asyncio.sleep(5)
    task.cancel()
    assert lm.renewals >= 2
    got = await reg.get_lease(lease.subnet)
    assert got is not None and got.etcd_lease == lease.etcd_lease
    assert await reg.time_to_live(lease.etcd_lease) > 0


async def test_own_key_deleted_is_reacquired_same_subnet(reg):
    lm = LeaseManager(reg, attrs(), CFG)
    lease = await lm.acquire()
    watcher = PeerWatcher(reg, lm.notice)
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(lm.maintain())]
    await asyncio.wait_for(watcher.synced.wait(), 5)
    assert await reg.delete_lease(lease.subnet)
    for _ in range(50):
        await asyncio.sleep(0.1)
        got = await reg.get_lease(lease.subnet)
        if got is not None:
            break
    for t in tasks:
        t.cancel()
    assert got is not None and got.attrs.public_ip == ME
    assert lm.lease.subnet == lease.subnet
    assert got.etcd_lease != lease.etcd_lease
    assert await reg.time_to_live(lease.etcd_lease) == -1  # the orphaned etcd lease was revoked


async def test_own_lease_made_a_reservation_is_adopted_as_one(reg, etcd_server):
    """`flannelctl reserve` of a node's own subnet while it runs: the node keeps the subnet
    as a reservation (no renewal, no expiry, its own attributes), without a busy loop."""
    lm = LeaseManager(reg, attrs(), CFG, ttl=3, renew_margin=1)
    lease = await lm.acquire()
    watcher = PeerWatcher(reg, lm.notice)
    tasks = [asyncio.create_task(watcher.run()), asyncio.create_task(lm.maintain())]
    try:
        await asyncio.wait_for(watcher.synced.wait(), 5)
        other = LeaseAttrs(ME, "udp")  # a record the watch reports: attributes differ
        etcd_server.etcdctl("put", reg.key(lease.subnet).decode(), other.encode().decode())
        for _ in range(50):
            await asyncio.sleep(0.1)
            if lm.lease.is_reservation:
                break
        assert lm.lease.subnet == lease.subnet and lm.lease.is_reservation
        assert lm.expires_at is None
        await asyncio.sleep(3)  # past the old lease's renewal time
        renewals, cpu = lm.renewals, time.process_time()
        await asyncio.sleep(1)
        assert time.process_time() - cpu < 0.5  # maintain() sleeps; it does not spin
        assert lm.renewals == renewals
        got = await reg.get_lease(lease.subnet)
        assert got is not None and got.etcd_lease == 0 and got.attrs == attrs()
    finally:
        for t in tasks:
            t.cancel()


async def test_thirty_racing_agents_get_distinct_subnets(etcd_server, etcd_prefix):
    # 40 subnets for 30 agents: candidates collide often, so lost races are exercised.
    cfg = parse_config('{"Network":"10.6.0.0/16","SubnetMin":"10.6.1.0","SubnetMax":"10.6.40.0"}')
    regs = [EtcdRegistry([etcd_server.endpoint], etcd_prefix) for _ in range(30)]
    try:
        lms = [
            LeaseManager(r, attrs(IPv4Address(f"192.0.2.{100 + i}")), cfg, rng=random.Random(i % 3))
            for i, r in enumerate(regs)
        ]
        leases = await asyncio.wait_for(asyncio.gather(*(lm.acquire() for lm in lms)), 60)
    finally:
        await asyncio.gather(*(r.close() for r in regs))
    assert len({lease.subnet for lease in leases}) == 30
    snap = await regs[0].snapshot()
    assert len(snap.leases) == 30
    assert {lease.attrs.public_ip for lease in snap.leases.values()} == {
        IPv4Address(f"192.0.2.{100 + i}") for i in range(30)
    }


async def test_out_of_subnets(reg):
    cfg = parse_config('{"Network":"10.7.0.0/16","SubnetMin":"10.7.1.0","SubnetMax":"10.7.2.0"}')
    for i, ip in enumerate(("192.0.2.50", "192.0.2.51")):
        await reg.create_lease(IPv4Network(f"10.7.{i + 1}.0/24"), attrs(IPv4Address(ip)), 60)
    with pytest.raises(OutOfSubnets, match="out of subnets"):
        await LeaseManager(reg, attrs(), cfg).acquire()


async def test_watch_across_compaction_reports_all_differences(reg, etcd_server):
    a, b, c = (IPv4Network(f"10.5.{i}.0/24") for i in (1, 2, 3))
    await reg.create_lease(a, attrs(IPv4Address("192.0.2.21")), 60)
    await reg.create_lease(b, attrs(IPv4Address("192.0.2.22")), 60)
    seen = []
    w = PeerWatcher(reg, seen.extend)
    await w.resync()
    assert {ch.subnet for ch in seen} == {a, b}
    seen.clear()
    # While the watcher is not following: one removed, one changed, one added; then compact.
    await reg.delete_lease(a)
    lease_b = await reg.get_lease(b)
    await reg.update_lease(lease_b, attrs(IPv4Address("192.0.2.32")))
    await reg.create_lease(c, attrs(IPv4Address("192.0.2.23")), 60)
    rev = json.loads(etcd_server.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"][
        "header"
    ]["revision"]
    etcd_server.etcdctl("compaction", str(rev))
    with pytest.raises(RevisionCompactedError):
        await w.follow()
    task = asyncio.create_task(w.run())
    w.revision = None  # what run() does after the compaction error above
    for _ in range(50):
        if len(seen) >= 3:
            break
        await asyncio.sleep(0.1)
    task.cancel()
    got = {(ch.kind, ch.subnet) for ch in seen}
    assert got == {("removed", a), ("changed", b), ("added", c)}
    assert w.table.leases[b].attrs.public_ip == IPv4Address("192.0.2.32")


async def test_malformed_peer_record_skipped_with_one_warning(reg, etcd_server, caplog):
    good = IPv4Network("10.5.1.0/24")
    await reg.create_lease(good, attrs(IPv4Address("192.0.2.21")), 60)
    bad_key = reg.subnets_prefix.decode() + "10.5.2.0-24"
    etcd_server.etcdctl("put", bad_key, "{not json")
    etcd_server.etcdctl("put", reg.subnets_prefix.decode() + "garbage", "{}")
    seen = []
    w = PeerWatcher(reg, seen.extend)
    task = asyncio.create_task(w.run())
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(w.synced.wait(), 5)
        # The same bad value again, then a bad update of the good peer: all skipped.
        etcd_server.etcdctl("put", bad_key, "{not json")
        etcd_server.etcdctl("put", reg.key(good).decode(), '{"PublicIP": 12}')
        other = IPv4Network("10.5.3.0/24")
        await reg.create_lease(other, attrs(IPv4Address("192.0.2.23")), 60)
        for _ in range(50):
            if other in w.table.leases:
                break
            await asyncio.sleep(0.1)
    task.cancel()
    assert set(w.table.leases) == {good, other}  # the good peer survived its bad update
    assert w.table.leases[good].attrs.public_ip == IPv4Address("192.0.2.21")
    assert not [ch for ch in seen if ch.kind == "removed"]
    assert {k: r.rule for k, r in w.table.rejected.items()} == {
        "10.5.2.0-24": "malformed",
        "garbage": "key",
        "10.5.1.0-24": "malformed",
    }
    # The log line is the behaviour here: a bad record is reported once, not once per put.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("10.5.2.0-24" in m for m in warnings) == 1


async def test_thousands_of_bogus_keys_are_skipped_in_few_lines(reg, caplog):
    good = [IPv4Network(f"10.5.{i}.0/24") for i in (1, 2)]
    for i, net in enumerate(good):
        await reg.create_lease(net, attrs(IPv4Address(f"192.0.2.{30 + i}")), 60)

    async def bogus(c):
        for i in range(3000):
            name = f"junk-{i}" if i % 2 else f"10.6.{i % 250}.{i // 250}-32"
            key = reg.subnets_prefix + name.encode()
            await c.put(key, b"\x00not a record")

    await reg.call(bogus)
    w = PeerWatcher(reg, lambda changes: None)
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(w.resync(), 30)
    assert set(w.table.leases) == set(good)
    assert len(w.table.rejected) == 3000
    # The log volume is the behaviour here: thousands of bad keys cost a few lines
    lines = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert 1 < len(lines) <= 25, len(lines)


# -- reservations in dual-stack and IPv6-only networks (`flannelctl reserve`) ----------------
ME6 = IPv6Address("fd00:192::11")
SIX = {"EnableIPv6": True, "IPv6Network": "fd00:5::/56", "Backend": {"Type": "host-gw"}}
DUAL_RAW = json.dumps({"Network": "10.5.0.0/16", **SIX}).encode()
V6_RAW = json.dumps({"EnableIPv4": False, **SIX}).encode()


def _ctl(etcd_server, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "flanneld.face.ctl", *args]
    cmd += ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", prefix]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)


async def test_dual_stack_reservation_is_taken_by_its_node_with_both_halves(
    reg, etcd_server, etcd_prefix
):
    await reg.put_config(DUAL_RAW)
    cfg = parse_config(DUAL_RAW)
    half = ("--ipv6-subnet", "fd00:5:0:7::/64", "--public-ipv6", str(ME6))
    done = _ctl(etcd_server, etcd_prefix, "reserve", "10.5.7.0/24", str(ME), *half)
    assert done.returncode == 0, done.stderr
    lease = await LeaseManager(reg, LeaseAttrs(ME, "host-gw", public_ipv6=ME6), cfg).acquire()
    assert lease.subnet == IPv4Network("10.5.7.0/24") and lease.is_reservation
    assert lease.ipv6_subnet == IPv6Network("fd00:5:0:7::/64")
    # without its IPv6 half a reservation would be dropped by its node: refused, not written
    bare = _ctl(etcd_server, etcd_prefix, "reserve", "10.5.8.0/24", "192.0.2.12")
    assert bare.returncode == 2 and await reg.get_lease(IPv4Network("10.5.8.0/24")) is None
    # an IPv6 half another node holds: refused, and nothing changed
    before = (await reg.snapshot()).leases
    clash = ("--ipv6-subnet", "fd00:5:0:7::/64", "--public-ipv6", "fd00:192::12")
    taken = _ctl(etcd_server, etcd_prefix, "reserve", "10.5.9.0/24", "192.0.2.12", *clash)
    assert taken.returncode == 2 and (await reg.snapshot()).leases == before


async def test_ipv6_only_reservation_is_taken_and_removed_by_its_ipv6_subnet(
    reg, etcd_server, etcd_prefix
):
    await reg.put_config(V6_RAW)
    cfg = parse_config(V6_RAW)
    done = _ctl(etcd_server, etcd_prefix, "reserve", "fd00:5:0:7::/64", str(ME6))
    assert done.returncode == 0, done.stderr
    assert list((await reg.snapshot()).leases) == ["0.0.0.0-0&fd00:5:0:7::-64"]
    attrs6 = LeaseAttrs(IPv4Address(0), "host-gw", public_ipv6=ME6)
    lease = await LeaseManager(reg, attrs6, cfg).acquire()
    assert lease.ipv6_subnet == IPv6Network("fd00:5:0:7::/64") and lease.is_reservation
    gone = _ctl(etcd_server, etcd_prefix, "unreserve", "fd00:5:0:7::/64")
    assert gone.returncode == 0, gone.stderr
    assert (await reg.snapshot()).leases == {}
