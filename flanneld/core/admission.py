"""The rules a lease record must pass before it may become kernel state on this node.

Any node can write under `<prefix>/subnets/` (DESIGN principle 7), so every record is checked
against the network config: its subnet lies inside Network and has exactly SubnetLen, its
PublicIP is a unicast address outside the overlay. (Keys are checked where they are parsed:
canonical, IPv4 only.) Two records that pass never overlap: subnets of one length are equal
or disjoint, and equal subnets have one canonical key. Pure: no I/O.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from flanneld.core.config import NetworkConfig
from flanneld.core.lease import Lease, RecordError

RULES = ("malformed", "key", "outside_network", "subnet_len", "public_ip")
_BROADCAST = IPv4Address("255.255.255.255")


def unicast_problem(ip: IPv4Address, link_local_ok: bool = False) -> str:
    """Why `ip` cannot be a node's address on the underlay ("" when it can)."""
    if ip.is_unspecified:
        return "is the unspecified address"
    if ip.is_loopback:
        return "is a loopback address"
    if ip.is_multicast:
        return "is a multicast address"
    if ip == _BROADCAST:
        return "is the broadcast address"
    if ip.is_link_local and not link_local_ok:
        return "is link-local (this node's own address is not)"
    if ip.is_reserved:
        return "is in the reserved range 240.0.0.0/4"
    return ""


class PeerRules:
    """Checks records against one network config. Link-local PublicIPs are accepted only when
    this node's own is link-local too (an underlay that really runs on 169.254.0.0/16)."""

    def __init__(self, config: NetworkConfig, own_public_ip: IPv4Address | None = None) -> None:
        self.network: IPv4Network = config.network
        self.subnet_len = config.subnet_len
        self.link_local_ok = bool(own_public_ip and own_public_ip.is_link_local)

    def check(self, lease: Lease) -> None:
        """Raise RecordError (with its rule) if the record must not be used."""
        subnet, ip = lease.subnet, lease.attrs.public_ip
        if not subnet.subnet_of(self.network):
            raise RecordError(
                f"subnet {subnet} is outside the Network {self.network}", "outside_network"
            )
        if subnet.prefixlen != self.subnet_len:
            raise RecordError(
                f"subnet {subnet} is not a /{self.subnet_len} (the config's SubnetLen)",
                "subnet_len",
            )
        if problem := unicast_problem(ip, self.link_local_ok):
            raise RecordError(f"PublicIP {ip} {problem}", "public_ip")
        if ip in self.network:
            raise RecordError(
                f"PublicIP {ip} is inside the overlay Network {self.network}", "public_ip"
            )
