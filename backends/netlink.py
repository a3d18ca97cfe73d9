"""Thin netlink I/O over pyroute2's `AsyncIPRoute`: dump the routes the agent owns, apply a
`reconcile.Diff` entry by entry, and look up the underlay interface. No policy lives here.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from .base import BackendError, ReconcileResult
from .reconcile import Diff, Entry, Route

log = logging.getLogger(__name__)

# Every route the agent installs carries this private routing protocol number (`ip route`
# shows "proto 155"). It is how the agent recognises its own routes after a restart, removes
# stale ones and leaves every other route alone. 155 is unassigned in iproute2's rt_protos
# (0-4 are the kernel's, the named daemons use 8-18, 42, 99 and 186-192) and differs from the
# reference flanneld's "proto boot" (3). A `replace` still takes over a route to a planned
# subnet whatever its protocol, so routes left by the reference flanneld are adopted.
ROUTE_PROTOCOL = 155
MAIN_TABLE = 254

# A delete that finds nothing: the entry is already gone, which is what was asked.
_GONE = {errno.ENOENT, errno.ESRCH}


def open_ipr(netns: str | None = None) -> AsyncIPRoute:
    """A netlink socket in this process's namespace, or in the named `netns`, which must exist.

    The agent runs inside the node's namespace and passes nothing; tests pass their namespace.
    (pyroute2 would create a missing namespace by default; `flags=0` makes that an error.)
    """
    return AsyncIPRoute() if netns is None else AsyncIPRoute(netns=netns, flags=0)


async def dump_routes(ipr: AsyncIPRoute, oif: int | None = None) -> set[Route]:
    """The IPv4 routes of the main table tagged `ROUTE_PROTOCOL`, optionally on one device."""
    match: dict[str, Any] = {"family": AF_INET, "table": MAIN_TABLE, "proto": ROUTE_PROTOCOL}
    if oif is not None:
        match["oif"] = oif
    routes = set()
    async for msg in await ipr.route("dump", **match):
        gateway = msg.get("gateway")
        routes.add(
            Route(
                dst=IPv4Network((msg.get("dst") or "0.0.0.0", msg["dst_len"])),
                gateway=IPv4Address(gateway) if gateway else None,
                oif=msg.get("oif") or 0,
                onlink=bool(msg["flags"] & RTNH_F_ONLINK),
            )
        )
    return routes


def _route_args(route: Route) -> dict[str, Any]:
    args: dict[str, Any] = {"dst": str(route.dst), "table": MAIN_TABLE, "proto": ROUTE_PROTOCOL}
    if route.gateway is not None:
        args["gateway"] = str(route.gateway)
    if route.oif:
        args["oif"] = route.oif
    return args


async def _route_replace(ipr: AsyncIPRoute, route: Route) -> None:
    flags = RTNH_F_ONLINK if route.onlink else 0
    await ipr.route("replace", flags=flags, **_route_args(route))


async def _route_del(ipr: AsyncIPRoute, route: Route) -> None:
    # dst, gateway, oif and proto all have to match: the kernel never deletes a foreign route.
    await ipr.route("del", **_route_args(route))


_Op = Callable[[AsyncIPRoute, Any], Awaitable[None]]

# (upsert, remove) per entry kind; vxlan adds "arp" and "fdb".
_OPS: dict[str, tuple[_Op, _Op]] = {"route": (_route_replace, _route_del)}


@dataclass
class Applied:
    """The entries one `apply` actually changed, in the order it changed them."""

    upserted: list[Entry] = field(default_factory=list)
    removed: list[Entry] = field(default_factory=list)


def _failed(result: ReconcileResult, verb: str, entry: Entry, err: NetlinkError) -> None:
    result.count(result.failed, entry.kind)
    log.warning("could not %s %s: %s (errno %d)", verb, entry, os.strerror(err.code), err.code)


async def apply(ipr: AsyncIPRoute, diff: Diff, result: ReconcileResult) -> Applied:
    """Remove, then upsert, in `Diff` order, counting into `result` by kind.

    A netlink error fails only its own entry (one warning line each); the others go on.
    Errors of the socket itself propagate.
    """
    done = Applied()
    for entry in diff.ordered_removes():
        try:
            await _OPS[entry.kind][1](ipr, entry)
        except NetlinkError as err:
            if err.code in _GONE:
                log.debug("%s was already gone", entry)
            else:
                _failed(result, "remove", entry, err)
            continue
        result.count(result.removed, entry.kind)
        done.removed.append(entry)
    for entry in diff.ordered_upserts():
        try:
            await _OPS[entry.kind][0](ipr, entry)
        except NetlinkError as err:
            _failed(result, "install", entry, err)
            continue
        result.count(result.added, entry.kind)
        done.upserted.append(entry)
    return done


@dataclass(frozen=True)
class Link:
    """An interface: its name, index, IPv4 address and MTU."""

    name: str
    index: int
    addr: IPv4Address
    mtu: int


async def _ipv4_addrs(ipr: AsyncIPRoute, index: int | None = None) -> list[tuple[int, str]]:
    match: dict[str, Any] = {"family": AF_INET}
    if index is not None:
        match["index"] = index
    return [(m["index"], m.get("address")) async for m in await ipr.addr("dump", **match)]


async def _link(ipr: AsyncIPRoute, index: int, addr: IPv4Address | None) -> Link:
    msg = (await ipr.link("get", index=index))[0]
    name = msg.get("ifname")
    if addr is None:
        addrs = await _ipv4_addrs(ipr, index)
        if not addrs:
            raise BackendError(
                f"interface {name} has no IPv4 address; give --iface an interface with one"
            )
        addr = IPv4Address(addrs[0][1])
    return Link(name, index, addr, msg.get("mtu"))


async def lookup_link(ipr: AsyncIPRoute, name_or_ip: str) -> Link:
    """The interface with this name (and its first IPv4 address), or the one holding this IP."""
    try:
        addr: IPv4Address | None = IPv4Address(name_or_ip)
    except ValueError:
        addr = None
    if addr is None:
        found = await ipr.link_lookup(ifname=name_or_ip)
        if not found:
            raise BackendError(f"interface {name_or_ip!r} not found; check --iface")
        return await _link(ipr, found[0], None)
    for index, a in await _ipv4_addrs(ipr):
        if a == str(addr):
            return await _link(ipr, index, addr)
    raise BackendError(f"no interface has the address {addr}; check --iface")


async def default_route_link(ipr: AsyncIPRoute) -> Link:
    """The interface of the IPv4 default route of the main table (lowest metric first)."""
    best: tuple[int, int] | None = None
    async for msg in await ipr.route("dump", family=AF_INET, table=MAIN_TABLE):
        oif = msg.get("oif")
        if msg["dst_len"] == 0 and oif:
            candidate = (msg.get("priority") or 0, oif)
            best = candidate if best is None else min(best, candidate)
    if best is None:
        raise BackendError("no IPv4 default route to pick the interface from; set --iface")
    return await _link(ipr, best[1], None)


async def find_interface(ipr: AsyncIPRoute, name_or_ip: str | None) -> Link:
    """The underlay interface for `--iface` (a name or an address), or the default route's."""
    if name_or_ip is None:
        return await default_route_link(ipr)
    return await lookup_link(ipr, name_or_ip)
