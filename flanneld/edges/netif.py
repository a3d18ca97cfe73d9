"""Reads the host's links, their IPv4 and global IPv6 addresses, and the default route (IPv4's,
else IPv6's) from the kernel (one dump each) for `flanneld.core.interfaces.select()`."""

from __future__ import annotations

import socket
from ipaddress import IPv4Interface, IPv6Interface

from flanneld.core.interfaces import Link

RT_SCOPE_UNIVERSE = 0  # a global address (link-local ones have scope link)


async def discover(ipr) -> tuple[list[Link], int | None]:  # noqa: ANN001 - AsyncIPRoute
    addrs: dict[int, list[IPv4Interface]] = {}
    async for msg in await ipr.addr("dump", family=socket.AF_INET):
        addrs.setdefault(msg["index"], []).append(
            IPv4Interface(f"{msg.get('address')}/{msg['prefixlen']}")
        )
    addrs6: dict[int, list[IPv6Interface]] = {}
    async for msg in await ipr.addr("dump", family=socket.AF_INET6):
        if msg["scope"] == RT_SCOPE_UNIVERSE:
            addrs6.setdefault(msg["index"], []).append(
                IPv6Interface(f"{msg.get('address')}/{msg['prefixlen']}")
            )
    links = []
    async for m in await ipr.link("dump"):
        ifaddrs, ifaddrs6 = addrs.get(m["index"], []), addrs6.get(m["index"], [])
        links.append(
            Link(
                m.get("ifname"),
                m["index"],
                m.get("mtu") or 0,
                tuple(a.ip for a in ifaddrs),
                tuple(a.network for a in ifaddrs),
                tuple(a.ip for a in ifaddrs6),
                tuple(a.network for a in ifaddrs6),
            )
        )
    for family in (socket.AF_INET, socket.AF_INET6):  # an IPv6 one only where IPv4 has none
        best: tuple[int, int] | None = None  # (metric, oif): the lowest metric wins
        async for r in await ipr.route("dump", family=family, table=254):
            if r["dst_len"] == 0 and r.get("oif"):
                cand = (r.get("priority") or 0, r.get("oif"))
                best = cand if best is None else min(best, cand)
        if best is not None:
            return links, best[1]
    return links, None
