"""Choosing the external interface: `--iface`, `--iface-regex`, `--public-ip`, default route.

Pure: `select()` works on a list of `Link`s (`flanneld.edges.netif.discover()` reads them from
the kernel) and gives the `ExternalInterface` the backends run on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

from flanneld.core.errors import StateError


@dataclass(frozen=True)
class ExternalInterface:
    """The underlay NIC: its name, index, own address, the address advertised, its MTU, the
    network of its address (None when unknown), and the same for IPv6 (None: no global IPv6
    address, so no dual-stack on this node). A NIC with IPv6 alone has NO_ADDRESS as its IPv4
    addresses: it can serve an IPv6-only network only (the agent checks against the config)."""

    name: str
    index: int
    iface_addr: IPv4Address
    ext_addr: IPv4Address
    mtu: int
    underlay: IPv4Network | None = None
    iface_addr6: IPv6Address | None = None
    ext_addr6: IPv6Address | None = None
    underlay6: IPv6Network | None = None


NO_ADDRESS = IPv4Address("0.0.0.0")  # an interface without IPv4 (an IPv6-only network's node)


class InterfaceError(StateError):
    """No usable external interface; the message says what was looked for and the fix."""


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]
    nets: tuple[IPv4Network, ...] = ()  # the networks of those addresses
    addrs6: tuple[IPv6Address, ...] = ()  # global IPv6 addresses (no link-local)
    nets6: tuple[IPv6Network, ...] = ()


def _parse_ip(s: str) -> IPv4Address | None:
    try:
        a = ip_address(s)
    except ValueError:
        return None
    return a if isinstance(a, IPv4Address) else None


def _first(link: Link) -> IPv4Address:
    return link.addrs[0] if link.addrs else NO_ADDRESS


def select(
    links: list[Link],
    ifaces: list[str],
    regexes: list[str],
    default_oif: int | None,
    public_ip: str = "",
    public_ipv6: str = "",
) -> ExternalInterface:
    pub6 = None
    if public_ipv6:
        try:
            pub6 = ip_address(public_ipv6)
        except ValueError:
            pub6 = None
        if not isinstance(pub6, IPv6Address):
            raise InterfaceError(
                f"--public-ipv6 {public_ipv6!r} is not an IPv6 address; fix the flag"
            )
    pub = None
    if public_ip:
        pub = _parse_ip(public_ip)
        if pub is None:
            raise InterfaceError(f"--public-ip {public_ip!r} is not an IPv4 address; fix the flag")
    if not ifaces and not regexes and pub is not None:
        ifaces = [str(pub)]  # the reference looks the public IP up as the interface

    chosen: tuple[Link, IPv4Address] | None = None
    for want in ifaces:
        ip = _parse_ip(want)
        for link in links:
            if (ip is not None and ip in link.addrs) or (ip is None and link.name == want):
                if ip is not None or link.addrs or link.addrs6:
                    chosen = (link, ip or _first(link))
                break
        if chosen:
            break
    if chosen is None and regexes:
        for rx in regexes:
            try:
                pat = re.compile(rx)
            except re.error as e:
                raise InterfaceError(
                    f"--iface-regex {rx!r} is not a valid regex ({e}); fix it"
                ) from None
            hit = next(((lk, a) for lk in links for a in lk.addrs if pat.search(str(a))), None)
            hit = hit or next(
                ((lk, lk.addrs[0]) for lk in links if lk.addrs and pat.search(lk.name)), None
            )
            if hit:
                chosen = hit
                break
    if chosen is None and (ifaces or regexes):
        asked = ", ".join([*ifaces, *(f"/{r}/" for r in regexes)])
        raise InterfaceError(
            f"no interface with an address matches {asked}; check --iface/--iface-regex "
            f"(interfaces here: {', '.join(lk.name for lk in links)})"
        )
    if chosen is None:
        link = next((lk for lk in links if lk.index == default_oif), None)
        if link is None or not (link.addrs or link.addrs6):
            raise InterfaceError(
                "no default route with an addressed interface; pass --iface NAME or --iface IP"
            )
        chosen = (link, _first(link))
    link, addr = chosen
    if not link.mtu:
        raise InterfaceError(f"interface {link.name} reports MTU 0; fix the interface")
    underlay = next((net for net in link.nets if addr in net), None)
    addr6 = link.addrs6[0] if link.addrs6 else None
    underlay6 = next((net for net in link.nets6 if addr6 in net), None) if addr6 else None
    return ExternalInterface(
        link.name,
        link.index,
        addr,
        pub or addr,
        link.mtu,
        underlay,
        addr6,
        pub6 or addr6,
        underlay6,
    )
