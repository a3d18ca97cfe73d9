"""The rules a lease record must pass before it may become kernel state on this node.

Any node can write under `<prefix>/subnets/` (DESIGN principle 7), so every record is checked
against the network config: its subnet lies inside Network and has exactly SubnetLen, its
PublicIP is a unicast address outside the overlay; the IPv6 half of a dual-stack record (only
where the config enables IPv6) likewise against IPv6Network. In an IPv6-only network a record
has the IPv6 half only (key `0.0.0.0-0&…`), and its PublicIP is not used. Keys are checked
where they are parsed (canonical form); records that claim the same space are ordered by age
in the peer table (`peers.PeerTable`), the older keeping it. Pure: no I/O.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from flanneld.core.config import NetworkConfig
from flanneld.core.lease import Lease, RecordError

RULES = ("malformed", "key", "outside_network", "subnet_len", "public_ip", "overlap")
_BROADCAST = IPv4Address("255.255.255.255")


def unicast_problem(ip: IPv4Address | IPv6Address, link_local_ok: bool = False) -> str:
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
    if ip.version == 4 and ip.is_reserved:
        return "is in the reserved range 240.0.0.0/4"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return "is an IPv4-mapped address"
    return ""


def _inside(subnet: IPv4Network | IPv6Network, network: IPv4Network | IPv6Network) -> bool:
    """`subnet.subnet_of(network)` (one family) without the broadcast address that ipaddress
    computes and then keeps on every subnet checked: 2 MB at 10,000 peers."""
    shift = network.max_prefixlen - network.prefixlen
    return subnet.prefixlen >= network.prefixlen and (
        int(subnet.network_address) >> shift == int(network.network_address) >> shift
    )


class PeerRules:
    """Checks records against one network config. Link-local PublicIPs are accepted only when
    this node's own is link-local too (an underlay that really runs on 169.254.0.0/16)."""

    def __init__(
        self,
        config: NetworkConfig,
        own_public_ip: IPv4Address | None = None,
        own_public_ipv6: IPv6Address | None = None,
    ) -> None:
        self.network: IPv4Network | None = config.network
        self.subnet_len = config.subnet_len
        self.ipv6 = config.ipv6
        self.link_local_ok = bool(own_public_ip and own_public_ip.is_link_local)
        self.link_local6_ok = bool(own_public_ipv6 and own_public_ipv6.is_link_local)

    def check(self, lease: Lease) -> None:
        """Raise RecordError (with its rule) if the record must not be used."""
        subnet, ip = lease.subnet, lease.attrs.public_ip
        if self.network is None:  # IPv6-only: the key has no IPv4 part, the IPv6 one is all
            if lease.has_ipv4 or lease.ipv6_subnet is None:
                raise RecordError(
                    f"the key {lease.key} is not an IPv6-only one (0.0.0.0-0&<IPv6 subnet>), "
                    "but the network config disables IPv4",
                    "key",
                )
            self._check6(lease.ipv6_subnet, lease.attrs.public_ipv6)
            return
        if not _inside(subnet, self.network):
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
        if lease.ipv6_subnet is not None:
            self._check6(lease.ipv6_subnet, lease.attrs.public_ipv6)

    def _check6(self, subnet: IPv6Network, ip: IPv6Address | None) -> None:
        """The IPv6 half of a dual-stack record, by the same rules."""
        if self.ipv6 is None:
            raise RecordError(
                f"the key has an IPv6 part ({subnet}), but the network config does not enable "
                "IPv6",
                "key",
            )
        network = self.ipv6.network
        if not _inside(subnet, network):
            raise RecordError(
                f"subnet {subnet} is outside the IPv6Network {network}", "outside_network"
            )
        if subnet.prefixlen != self.ipv6.subnet_len:
            raise RecordError(
                f"subnet {subnet} is not a /{self.ipv6.subnet_len} (the config's IPv6SubnetLen)",
                "subnet_len",
            )
        if ip is None:
            raise RecordError(f"subnet {subnet} comes with no PublicIPv6", "public_ip")
        if problem := unicast_problem(ip, self.link_local6_ok):
            raise RecordError(f"PublicIPv6 {ip} {problem}", "public_ip")
        if ip in network:
            raise RecordError(
                f"PublicIPv6 {ip} is inside the overlay IPv6Network {network}", "public_ip"
            )
