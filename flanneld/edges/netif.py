"""Reads the host's links, IPv4 addresses and default route from the kernel (one dump each)
for `flanneld.core.interfaces.select()`."""

from __future__ import annotations

import socket
from ipaddress import IPv4Interface

from flanneld.core.interfaces import Link


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
