"""Dual-stack leases against a real etcd (issue 15): the reference's keys and records, taken,
reused and followed like IPv4 ones."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Address, IPv6Address, IPv6Network

import pytest

from flanneld.agent.leasemgr import LeaseManager
from flanneld.agent.watcher import PeerWatcher
from flanneld.core.admission import PeerRules
from flanneld.core.config import parse_config
from flanneld.core.lease import LeaseAttrs
from flanneld.edges.registry import EtcdRegistry

CFG = parse_config(
    json.dumps(
        {
            "Network": "10.5.0.0/16",
            "EnableIPv6": True,
            "IPv6Network": "fd00:5::/56",
            "Backend": {"Type": "host-gw"},
        }
    )
)
ME = LeaseAttrs(IPv4Address("192.0.2.11"), "host-gw", public_ipv6=IPv6Address("fd00:192::11"))


@pytest.fixture
async def reg(etcd_server, etcd_prefix):
    r = EtcdRegistry([etcd_server.endpoint], etcd_prefix)
    yield r
    await r.close()


async def test_a_dual_stack_lease_is_written_as_the_reference_writes_it(reg, etcd_server):
    lease = await LeaseManager(reg, ME, CFG).acquire()
    assert lease.ipv6_subnet is not None and CFG.ipv6.contains(lease.ipv6_subnet)
    keys = etcd_server.etcdctl("get", "--prefix", "--keys-only", reg.subnets_prefix.decode())
    key = f"{lease.subnet.network_address}-24&{lease.ipv6_subnet.network_address}-64"
    assert keys.split() == [reg.subnets_prefix.decode() + key]
    value = etcd_server.etcdctl("get", "--print-value-only", reg.subnets_prefix.decode() + key)
    assert json.loads(value) == {
        "PublicIP": "192.0.2.11",
        "PublicIPv6": "fd00:192::11",
        "BackendType": "host-gw",
    }
    # a restart reuses both halves, the same etcd lease
    again = await LeaseManager(reg, ME, CFG).acquire()
    assert (again.subnet, again.ipv6_subnet, again.etcd_lease) == (
        lease.subnet,
        lease.ipv6_subnet,
        lease.etcd_lease,
    )
    assert (await reg.get_lease(lease.subnet)).ipv6_subnet == lease.ipv6_subnet
    assert await reg.delete_lease(lease)
    assert await reg.get_lease(lease.subnet) is None


async def test_previous_ipv6_subnet_comes_back(reg):
    prev6 = IPv6Network("fd00:5:0:42::/64")
    lease = await LeaseManager(reg, ME, CFG, previous6=prev6).acquire()
    assert lease.ipv6_subnet == prev6


async def test_a_reference_dual_stack_record_is_followed(reg, etcd_server):
    w = PeerWatcher(reg, lambda changes: None, check=PeerRules(CFG).check)
    task = asyncio.create_task(w.run())
    try:
        await asyncio.wait_for(w.synced.wait(), 5)
        key = reg.subnets_prefix.decode() + "10.5.7.0-24&fd00:5:0:7::-64"
        etcd_server.etcdctl(
            "put",
            key,
            '{"PublicIP":"192.0.2.17","PublicIPv6":"fd00:192::17","BackendType":"host-gw"}',
        )
        for _ in range(100):
            if w.table.leases:
                break
            await asyncio.sleep(0.05)
        [peer] = w.table.leases.values()
        assert peer.ipv6_subnet == IPv6Network("fd00:5:0:7::/64")
        assert peer.attrs.public_ipv6 == IPv6Address("fd00:192::17")
    finally:
        task.cancel()
