"""Thin netlink I/O over pyroute2's `AsyncIPRoute`: dump the routes, ARP and FDB entries the
agent owns, apply a `reconcile.Diff` entry by entry. No policy lives here.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_interface, ip_network
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP
from pyroute2.netlink.rtnl.ndmsg import NTF_SELF, NUD_PERMANENT
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from .base import ReconcileResult
from .reconcile import Diff, Entry, Fdb, Neigh, Route

log = logging.getLogger(__name__)
Network = IPv4Network | IPv6Network

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


def _family(version: int) -> int:
    return AF_INET if version == 4 else AF_INET6


async def own_address_up(ipr: AsyncIPRoute, link: Any, subnet: Network, network: Network) -> None:
    """Make `<subnet network address>/32` (/128 for IPv6) the only address out of `network` on
    the device of `link` (a reply of `link get`; other addresses are left alone), and the
    device up."""
    index, name = link["index"], link.get_attr("IFLA_IFNAME")
    bits = subnet.max_prefixlen
    want = ip_interface(f"{subnet.network_address}/{bits}")
    have = set()
    async for msg in await ipr.addr("dump", family=_family(subnet.version), index=index):
        have.add(ip_interface((msg.get("address"), msg["prefixlen"])))
    for addr in sorted(have - {want}):
        if addr.ip in network:
            await ipr.addr(
                "del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen
            )
            log.info("device %s: removed old address %s", name, addr)
    if want not in have:
        await ipr.addr("add", index=index, address=str(want.ip), prefixlen=bits)
        log.info("device %s: address %s", name, want)
    if not link["flags"] & IFF_UP:
        await ipr.link("set", index=index, state="up")
        log.info("device %s is up", name)


def open_ipr(netns: str | None = None) -> AsyncIPRoute:
    """A netlink socket in this process's namespace, or in the named `netns`, which must exist.

    The agent runs inside the node's namespace and passes nothing; tests pass their namespace.
    pyroute2 opens the socket on the first request, and by default would create a missing
    namespace then; `flags=0` makes that request raise FileNotFoundError instead.
    """
    return AsyncIPRoute() if netns is None else AsyncIPRoute(netns=netns, flags=0)


async def dump_routes(ipr: AsyncIPRoute, oif: int | None = None, version: int = 4) -> set[Route]:
    """The routes of the main table tagged `ROUTE_PROTOCOL` (IPv4, or IPv6 with `version`
    6), optionally on one device."""
    family = _family(version)
    match: dict[str, Any] = {"family": family, "table": MAIN_TABLE, "proto": ROUTE_PROTOCOL}
    if oif is not None:
        match["oif"] = oif
    routes = set()
    anywhere = "0.0.0.0" if version == 4 else "::"
    async for msg in await ipr.route("dump", **match):
        gateway = msg.get("gateway")
        routes.add(
            Route(
                dst=ip_network((msg.get("dst") or anywhere, msg["dst_len"])),
                gateway=ip_address(gateway) if gateway else None,
                oif=msg.get("oif") or 0,
                onlink=bool(msg["flags"] & RTNH_F_ONLINK),
            )
        )
    return routes


async def dump_neighs(ipr: AsyncIPRoute, ifindex: int, version: int = 4) -> set[Neigh]:
    """The permanent ARP (IPv4) or NDP (IPv6) entries on one device."""
    entries = set()
    async for msg in await ipr.neigh("dump", family=_family(version), ifindex=ifindex):
        lladdr = msg.get("lladdr")
        if msg["state"] & NUD_PERMANENT and lladdr:
            entries.add(Neigh(ifindex, ip_address(msg.get("dst")), lladdr))
    return entries


def is_unicast(mac: str) -> bool:
    """A MAC `aa:bb:…` names one station: neither all zeros nor a group address."""
    return mac != "00:00:00:00:00:00" and not int(mac[:2], 16) & 1


async def dump_fdb(ipr: AsyncIPRoute, ifindex: int) -> set[Fdb]:
    """The permanent FDB entries of one VXLAN device that send a unicast MAC to a remote.

    The all-zeros and multicast entries (flooding) are someone else's and never listed.
    """
    entries = set()
    async for msg in await ipr.fdb("dump", ifindex=ifindex):
        lladdr, dst = msg.get("lladdr"), msg.get("dst")
        if msg["state"] & NUD_PERMANENT and lladdr and is_unicast(lladdr) and dst:
            entries.add(Fdb(ifindex, lladdr, ip_address(dst)))
    return entries


def _route_args(route: Route) -> dict[str, Any]:
    args: dict[str, Any] = {
        "dst": str(route.dst),
        "family": _family(route.dst.version),
        "table": MAIN_TABLE,
        "proto": ROUTE_PROTOCOL,
    }
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


async def _neigh_replace(ipr: AsyncIPRoute, neigh: Neigh) -> None:
    await ipr.neigh(
        "replace",
        family=_family(neigh.dst.version),
        ifindex=neigh.ifindex,
        dst=str(neigh.dst),
        lladdr=neigh.lladdr,
        state=NUD_PERMANENT,
    )


async def _neigh_del(ipr: AsyncIPRoute, neigh: Neigh) -> None:
    await ipr.neigh(
        "del", family=_family(neigh.dst.version), ifindex=neigh.ifindex, dst=str(neigh.dst)
    )


async def _fdb_replace(ipr: AsyncIPRoute, fdb: Fdb) -> None:
    # Without explicit state and flags the kernel refuses a replace (EOPNOTSUPP). A replace
    # moves an existing entry for this MAC to the new remote.
    await ipr.fdb(
        "replace",
        ifindex=fdb.ifindex,
        lladdr=fdb.lladdr,
        dst=str(fdb.dst),
        state=NUD_PERMANENT,
        flags=NTF_SELF,
    )


async def _fdb_del(ipr: AsyncIPRoute, fdb: Fdb) -> None:
    await ipr.fdb("del", ifindex=fdb.ifindex, lladdr=fdb.lladdr, dst=str(fdb.dst))


_Op = Callable[[AsyncIPRoute, Any], Awaitable[None]]

# (upsert, remove) per entry kind.
_OPS: dict[str, tuple[_Op, _Op]] = {
    "route": (_route_replace, _route_del),
    "arp": (_neigh_replace, _neigh_del),
    "fdb": (_fdb_replace, _fdb_del),
}


@dataclass
class Applied:
    """The entries one `apply` actually changed, in the order it changed them, and those it
    found already gone when it came to remove them (no longer in the kernel all the same)."""

    upserted: list[Entry] = field(default_factory=list)
    removed: list[Entry] = field(default_factory=list)
    gone: list[Entry] = field(default_factory=list)

    def report(
        self,
        before: Iterable[Entry],
        planned: Set[Entry],
        result: ReconcileResult,
        describe: Callable[[Entry], str],
    ) -> None:
        """One log line per entry changed; an entry added again that the previous plan had
        too was deleted behind our back: counted as `repaired` (flannel_entries_total)."""
        old = {(e.kind, e.key): e for e in before}
        for entry in self.removed:
            log.info("%s removed: %s", entry.kind, describe(entry))
        for entry in self.upserted:
            was = old.get((entry.kind, entry.key))
            if was is not None:
                log.info("%s changed: %s (was %s)", entry.kind, describe(entry), describe(was))
            elif entry in planned:
                result.count(result.repaired, entry.kind)
                log.info("%s restored: %s", entry.kind, describe(entry))
            else:
                log.info("%s added: %s", entry.kind, describe(entry))


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
                done.gone.append(entry)
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
