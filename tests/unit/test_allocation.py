import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from flanneld.core.allocation import CANDIDATES, OutOfSubnets, choose_subnet
from flanneld.core.config import parse_config
from flanneld.core.lease import Lease, LeaseAttrs

CFG = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.200.0"}')
ME = IPv4Address("192.0.2.11")
OTHER = IPv4Address("192.0.2.12")


def lease(net, ip=OTHER, etcd_lease=7):
    return Lease(IPv4Network(net), LeaseAttrs(ip, "host-gw"), etcd_lease)


def test_reuses_lease_held_by_public_ip():
    mine = lease("10.5.7.0/24", ME)
    c = choose_subnet(CFG, [lease("10.5.1.0/24"), mine], ME, previous=IPv4Network("10.5.9.0/24"))
    assert c.subnet == IPv4Network("10.5.7.0/24") and c.existing == mine


def test_prefers_reservation_of_this_node():
    res = lease("10.5.50.0/24", ME, etcd_lease=0)
    c = choose_subnet(CFG, [lease("10.5.7.0/24", ME), res], ME)
    assert c.existing == res and c.existing.is_reservation


def test_own_lease_outside_range_is_stale():
    stale = lease("10.5.250.0/24", ME)
    c = choose_subnet(CFG, [stale], ME, rng=random.Random(1))
    assert c.existing is None and c.stale == (stale,)
    assert CFG.contains_lease(c.subnet)


def test_previous_subnet_used_when_free():
    c = choose_subnet(CFG, [lease("10.5.1.0/24")], ME, previous=IPv4Network("10.5.9.0/24"))
    assert c.subnet == IPv4Network("10.5.9.0/24") and c.existing is None


@pytest.mark.parametrize("prev", ["10.5.1.0/24", "10.5.250.0/24", "10.5.9.0/25"])
def test_previous_subnet_ignored_when_taken_or_unfit(prev):
    c = choose_subnet(
        CFG, [lease("10.5.1.0/24")], ME, previous=IPv4Network(prev), rng=random.Random(3)
    )
    assert c.subnet != IPv4Network(prev)
    assert c.subnet != IPv4Network("10.5.1.0/24")


def test_random_among_first_free_candidates():
    taken = [lease(f"10.5.{i}.0/24") for i in range(1, 11)]
    seen = {choose_subnet(CFG, taken, ME, rng=random.Random(s)).subnet for s in range(200)}
    first, last = 11, 10 + CANDIDATES
    assert all(first <= int(n.network_address.packed[2]) <= last for n in seen)
    assert len(seen) > 20  # random, not always the first free one


def test_overlapping_foreign_lease_blocks_subnets():
    c = choose_subnet(
        parse_config('{"Network":"10.5.0.0/16","SubnetMax":"10.5.2.0"}'), [lease("10.5.0.0/23")], ME
    )
    # 10.5.0.0/23 covers .0 and .1; only 10.5.2.0/24 is left
    assert c.subnet == IPv4Network("10.5.2.0/24")


def test_out_of_subnets():
    cfg = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.1.0","SubnetMax":"10.5.2.0"}')
    with pytest.raises(OutOfSubnets, match="SubnetMin/SubnetMax"):
        choose_subnet(cfg, [lease("10.5.1.0/24"), lease("10.5.2.0/24")], ME)
