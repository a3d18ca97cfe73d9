"""Thin netlink I/O: a device's own address over pyroute2's `AsyncIPRoute`, and a
`reconcile.Diff` applied through the lean socket of `backends.rtnl` (which also dumps the
routes, ARP/NDP and FDB entries the agent owns). No policy lives here.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_interface
from socket import AF_INET, AF_INET6
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP

from .base import ReconcileResult
from .reconcile import Diff, Entry, is_unicast
from .rtnl import EVERY_ID, MAIN_TABLE, ROUTE_PROTOCOL, Rtnl, requests

log = logging.getLogger(__name__)
__all__ = [
    "MAIN_TABLE",
    "ROUTE_PROTOCOL",
    "Applied",
    "apply",
    "is_unicast",
    "open_ipr",
    "own_address_up",
]
Network = IPv4Network | IPv6Network


IFA_F_NODAD = 0x02  # linux/if_addr.h

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
        # IPv6: no duplicate address detection (the address is this node's own by lease), so
        # it is usable at once instead of tentative for a second
        flags = {"flags": IFA_F_NODAD} if subnet.version == 6 else {}
        await ipr.addr("add", index=index, address=str(want.ip), prefixlen=bits, **flags)
        log.info("device %s: address %s", name, want)
    if not link["flags"] & IFF_UP:
        await ipr.link("set", index=index, state="up")
        log.info("device %s is up", name)


async def delete_link(ipr: AsyncIPRoute, name: str, kinds: tuple[str, ...]) -> bool:
    """Delete the device `name` if it exists and is of one of `kinds` (a link kind: "vxlan",
    "tun", ...); True when it was deleted."""
    try:
        [link] = await ipr.link("get", ifname=name)
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise
        return False
    if link.get(("linkinfo", "kind")) not in kinds:
        return False
    await ipr.link("del", index=link["index"])
    return True


def open_ipr(netns: str | None = None) -> AsyncIPRoute:
    """A netlink socket in this process's namespace, or in the named `netns`, which must exist.

    The agent runs inside the node's namespace and passes nothing; tests pass their namespace.
    pyroute2 opens the socket on the first request, and by default would create a missing
    namespace then; `flags=0` makes that request raise FileNotFoundError instead.
    """
    return AsyncIPRoute() if netns is None else AsyncIPRoute(netns=netns, flags=0)


LOG_LIMIT = 50  # entries changed in one pass logged one by one at INFO; the rest at DEBUG


@dataclass
class Applied:
    """The entries one `apply` actually changed, in the order it changed them, those it found
    already gone when it came to remove them (no longer in the kernel all the same), and those
    the kernel refused."""

    upserted: list[Entry] = field(default_factory=list)
    removed: list[Entry] = field(default_factory=list)
    gone: list[Entry] = field(default_factory=list)
    failed: list[Entry] = field(default_factory=list)

    def report(
        self,
        before: Iterable[Entry],
        planned: Set[Entry],
        result: ReconcileResult,
        describe: Callable[[Entry], str],
    ) -> None:
        """`report_slots` with what was in the kernel before (`before`) and the previous plan
        (`planned`) as sets of entries."""
        old = {e.slot: e for e in before}
        self.report_slots(old, planned.__contains__, result, describe)

    def report_slots(
        self,
        before: Mapping[tuple, Entry],
        planned: Callable[[Entry], bool],
        result: ReconcileResult,
        describe: Callable[[Entry], str],
    ) -> None:
        """One log line per entry changed (past LOG_LIMIT of them, at DEBUG, and one line
        that says how many); `before`: what was in each upserted slot, if anything. An entry
        added again that the previous plan had too (`planned`) was deleted behind our back:
        counted as `repaired` (flannel_entries_total)."""
        lines = 0

        def say(what: str, entry: Entry, was: Entry | None = None) -> None:
            nonlocal lines
            lines += 1
            level = logging.INFO if lines <= LOG_LIMIT else logging.DEBUG
            if not log.isEnabledFor(level):
                return
            if was is None:
                log.log(level, "%s %s: %s", entry.kind, what, describe(entry))
            else:
                log.log(
                    level, "%s %s: %s (was %s)", entry.kind, what, describe(entry), describe(was)
                )

        for entry in self.removed:
            say("removed", entry)
        for entry in self.upserted:
            was = before.get(entry.slot)
            if was is not None:
                say("changed", entry, was)
            elif planned(entry):
                result.count(result.repaired, entry.kind)
                say("restored", entry)
            else:
                say("added", entry)
        if lines > LOG_LIMIT:
            log.info("... and %d more entries changed (logged at debug level)", lines - LOG_LIMIT)


def _failed(result: ReconcileResult, verb: str, entry: Entry, code: int) -> None:
    result.count(result.failed, entry.kind)
    log.warning("could not %s %s: %s (errno %d)", verb, entry, os.strerror(code), code)


async def apply(rtnl: Rtnl, diff: Diff, result: ReconcileResult) -> Applied:
    """Remove, then upsert, in `Diff` order, counting into `result` by kind; every request
    pipelined on the lean socket (`backends.rtnl`), in that order.

    A netlink error fails only its own entry (one warning line each); the others go on.
    Errors of the socket itself propagate.
    """
    removes, upserts = diff.ordered_removes(), diff.ordered_upserts()
    sizes: list[int] = []  # requests per entry (a route through a nexthop object: two)

    def each() -> Iterator[tuple[int, int, bytes]]:
        """Built as they are sent: 30,000 requests held at once would add ~4 MB to the peak."""
        # a delete takes a route's nexthop object with it whichever way it was made
        plain = rtnl.foreign if rtnl.nexthops else EVERY_ID
        for delete, entries in ((True, removes), (False, upserts)):
            for entry in entries:
                reqs = requests(entry, delete, rtnl.foreign if delete else plain)
                sizes.append(len(reqs))
                yield from reqs

    codes = iter(await rtnl.run(each()))
    done = Applied()
    for entry, size in zip(removes, sizes, strict=False):
        code = [next(codes) for _ in range(size)][0]  # the route's: its nexthop may be gone
        if code in _GONE:
            done.gone.append(entry)
        elif code:
            _failed(result, "remove", entry, code)
            done.failed.append(entry)
        else:
            result.count(result.removed, entry.kind)
            done.removed.append(entry)
    for entry, size in zip(upserts, sizes[len(removes) :], strict=True):
        code = next((c for c in [next(codes) for _ in range(size)] if c), 0)
        if code:
            _failed(result, "install", entry, code)
            done.failed.append(entry)
        else:
            result.count(result.added, entry.kind)
            done.upserted.append(entry)
    return done
