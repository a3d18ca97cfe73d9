"""Choosing the external interface: `--iface`, `--iface-regex`, `--public-ip`, default route.

`select()` is pure (it works on a list of `Link`s); `discover()` reads the links, addresses and
the default route from the kernel with one dump each.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address

from backends.base import ExternalInterface


class InterfaceError(RuntimeError):
    """No usable external interface; the message says what was looked for and the fix."""


@dataclass(frozen=True)
class Link:
    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]
    nets: tuple[IPv4Network, ...] = ()  # the networks of those addresses


def _parse_ip(s: str) -> IPv4Address | None:
    try:
        a = ip_address(s)
    except ValueError:
        return None
    return a if isinstance(a, IPv4Address) else None


def select(
    links: list[Link],
    ifaces: list[str],
    regexes: list[str],
    default_oif: int | None,
    public_ip: str = "",
) -> ExternalInterface:
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
                if ip is not None or link.addrs:
                    chosen = (link, ip or link.addrs[0])
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
            f"no interface with an IPv4 address matches {asked}; check --iface/--iface-regex "
            f"(interfaces here: {', '.join(lk.name for lk in links)})"
        )
    if chosen is None:
        link = next((lk for lk in links if lk.index == default_oif), None)
        if link is None or not link.addrs:
            raise InterfaceError(
                "no IPv4 default route with an addressed interface; pass --iface NAME or --iface IP"
            )
        chosen = (link, link.addrs[0])
    link, addr = chosen
    if not link.mtu:
        raise InterfaceError(f"interface {link.name} reports MTU 0; fix the interface")
    underlay = next((net for net in link.nets if addr in net), None)
    return ExternalInterface(link.name, link.index, addr, pub or addr, link.mtu, underlay)


async def discover(ipr) -> tuple[list[Link], int | None]:  # noqa: ANN001 - AsyncIPRoute
    addrs: dict[int, list[IPv4Interface]] = {}
    async for msg in await ipr.addr("dump", family=socket.AF_INET):
        addrs.setdefault(msg["index"], []).append(
            IPv4Interface(f"{msg.get('address')}/{msg['prefixlen']}")
        )
    links = []
    async for m in await ipr.link("dump"):
        ifaddrs = addrs.get(m["index"], [])
        links.append(
            Link(
                m.get("ifname"),
                m["index"],
                m.get("mtu") or 0,
                tuple(a.ip for a in ifaddrs),
                tuple(a.network for a in ifaddrs),
            )
        )
    best: tuple[int, int] | None = None  # (metric, oif): the lowest metric wins
    async for r in await ipr.route("dump", family=socket.AF_INET, table=254):
        if r["dst_len"] == 0 and r.get("oif"):
            cand = (r.get("priority") or 0, r.get("oif"))
            best = cand if best is None else min(best, cand)
    return links, best[1] if best else None
