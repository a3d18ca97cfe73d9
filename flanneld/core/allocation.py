"""Choosing this node's subnet from the leases in etcd: a pure decision, no I/O.

Order (the reference's, kept): the lease already held by this PublicIP if it fits the config;
the subnet of the previous subnet.env if free; a random free subnet among the first
`CANDIDATES` free ones in [SubnetMin, SubnetMax]. The caller claims the choice atomically and
calls again with a fresh listing when it loses a race.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flanneld.core.config import NetworkConfig
from flanneld.core.errors import StateError
from flanneld.core.lease import Lease
from flanneld.core.subnets import OverlapIndex, iter_range

CANDIDATES = 100


class OutOfSubnets(StateError):
    """Every subnet in [SubnetMin, SubnetMax] is taken."""


@dataclass(frozen=True)
class Choice:
    subnet: IPv4Network
    existing: Lease | None = None  # our own lease (or reservation) to keep using
    stale: tuple[Lease, ...] = ()  # our own leases that no longer fit the config: delete them


def choose_subnet(
    config: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
) -> Choice:
    leases = list(leases)
    mine = [lease for lease in leases if lease.attrs.public_ip == public_ip]
    fitting = [lease for lease in mine if config.contains_lease(lease.subnet)]
    if fitting:
        # Prefer a reservation: it is the operator's explicit choice for this node.
        best = min(fitting, key=lambda lease: (not lease.is_reservation, lease.subnet))
        return Choice(best.subnet, existing=best)
    stale = tuple(mine)
    taken = OverlapIndex([lease.subnet for lease in leases if lease not in stale])

    if previous is not None and config.contains_lease(previous) and not taken.overlaps(previous):
        return Choice(previous, stale=stale)

    free: list[IPv4Network] = []
    for net in iter_range(config.subnet_min, config.subnet_max, config.subnet_len):
        if not taken.overlaps(net):
            free.append(net)
            if len(free) >= CANDIDATES:
                break
    if not free:
        raise OutOfSubnets(
            f"out of subnets: all of {config.subnet_min}..{config.subnet_max} "
            f"(/{config.subnet_len}) are leased; widen SubnetMin/SubnetMax or Network, "
            "or delete stale leases"
        )
    return Choice((rng or random).choice(free), stale=stale)
