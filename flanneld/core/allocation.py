"""Choosing this node's subnet from the leases in etcd: a pure decision, no I/O.

Order (the reference's, kept): the lease already held by this PublicIP if it fits the config;
the subnet of the previous subnet.env if free; a random free subnet among the first
`CANDIDATES` free ones in [SubnetMin, SubnetMax]. The caller claims the choice atomically and
calls again with a fresh listing when it loses a race.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from flanneld.core.config import NO_IPV4, NetworkConfig
from flanneld.core.errors import StateError
from flanneld.core.lease import Lease
from flanneld.core.subnets import Address, Network, OverlapIndex, iter_range

CANDIDATES = 100


class OutOfSubnets(StateError):
    """Every subnet in [SubnetMin, SubnetMax] is taken."""


@dataclass(frozen=True)
class Choice:
    subnet: IPv4Network
    existing: Lease | None = None  # our own lease (or reservation) to keep using
    stale: tuple[Lease, ...] = ()  # our own leases that no longer fit the config: delete them
    subnet6: IPv6Network | None = None  # with EnableIPv6: the IPv6 half


def _fits(config: NetworkConfig, lease: Lease) -> bool:
    """A lease of ours fits the config: its IPv4 subnet, and an IPv6 subnet exactly when the
    config enables IPv6."""
    if not config.contains_lease(lease.subnet):
        return False
    if config.ipv6 is None or lease.ipv6_subnet is None:
        return config.ipv6 is None and lease.ipv6_subnet is None
    return config.ipv6.contains(lease.ipv6_subnet)


def _pick(
    taken: OverlapIndex,
    previous: Network | None,
    fits: Callable[[Any], bool],
    lo: Address,
    hi: Address,
    length: int,
    rng: random.Random,
) -> Network | None:
    """The previous subnet if free, else a random one of the first CANDIDATES free ones."""
    if previous is not None and fits(previous) and not taken.overlaps(previous):
        return previous
    free: list[Network] = []
    for net in iter_range(lo, hi, length):
        if not taken.overlaps(net):
            free.append(net)
            if len(free) >= CANDIDATES:
                break
    return rng.choice(free) if free else None


def choose_subnet(
    config: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address | IPv6Address,
    previous: IPv4Network | None = None,
    rng: random.Random | None = None,
    previous6: IPv6Network | None = None,
) -> Choice:
    """IPv6 (with EnableIPv6) is chosen the same way, independently, as the reference does.
    `public_ip` names this node (`LeaseAttrs.node_ip`: PublicIPv6 in an IPv6-only network,
    where the IPv4 subnet is NO_IPV4)."""
    rng = rng or random.Random()
    leases = list(leases)
    mine = [lease for lease in leases if lease.attrs.node_ip == public_ip]
    fitting = [lease for lease in mine if _fits(config, lease)]
    if fitting:
        # Prefer a reservation: it is the operator's explicit choice for this node.
        best = min(fitting, key=lambda lease: (not lease.is_reservation, lease.key))
        return Choice(best.subnet, existing=best, subnet6=best.ipv6_subnet)
    stale = tuple(mine)
    others = [lease for lease in leases if lease not in stale]
    subnet = NO_IPV4 if config.network is None else _pick(
        OverlapIndex(lease.subnet for lease in others if lease.has_ipv4),
        previous,
        config.contains_lease,
        config.subnet_min,
        config.subnet_max,
        config.subnet_len,
        rng,
    )
    if subnet is None:  # the IPv4 range is full
        raise OutOfSubnets(
            f"out of subnets: all of {config.subnet_min}..{config.subnet_max} "
            f"(/{config.subnet_len}) are leased; widen SubnetMin/SubnetMax or Network, "
            "or delete stale leases"
        )
    if config.ipv6 is None:
        return Choice(subnet, stale=stale)
    v6 = config.ipv6
    subnet6 = _pick(
        OverlapIndex(lease.ipv6_subnet for lease in others if lease.ipv6_subnet is not None),
        previous6,
        v6.contains,
        v6.subnet_min,
        v6.subnet_max,
        v6.subnet_len,
        rng,
    )
    if subnet6 is None:
        raise OutOfSubnets(
            f"out of IPv6 subnets: all of {v6.subnet_min}..{v6.subnet_max} "
            f"(/{v6.subnet_len}) are leased; widen IPv6SubnetMin/IPv6SubnetMax or IPv6Network, "
            "or delete stale leases"
        )
    return Choice(subnet, stale=stale, subnet6=subnet6)
