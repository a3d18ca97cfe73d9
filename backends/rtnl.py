"""A lean rtnetlink socket for the entries the agent owns by the thousand: routes, ARP/NDP
neighbours and VXLAN FDB entries, dumped and changed without pyroute2.

Theory of operation. pyroute2 awaits one request at a time and decodes every attribute of
every message; at 5,000 vxlan peers that made programming them take 5-7 s and a full dump
1.5 s. Here a dump reads only the fields the agent compares (destination, gateway, device,
onlink; neighbour IP and MAC; FDB MAC and remote) with `struct`, and a batch of changes is
pipelined: the requests are packed back to back into a few large sends (the kernel handles
the messages of one send in order, so ARP and FDB entries still precede the routes through
them), each asks for an acknowledgement, and the acknowledgements are read as they come and
matched by sequence number to give each request its own result. The kernel does the work of a
request within the send, so changes are sent from a worker thread: the event loop runs on.
Links and addresses stay with pyroute2 (`backends.netlink`): they are few.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping, Set
from ipaddress import IPv4Network, IPv6Network, ip_address

from .reconcile import (
    Entry,
    Fdb,
    Neigh,
    Route,
    fdb_slot,
    neigh_slot,
    raw_key,
    route_ident,
    route_slot,
)

# Every route the agent installs carries this private routing protocol number (`ip route`
# shows "proto 155"). It is how the agent recognises its own routes after a restart, removes
# stale ones and leaves every other route alone. 155 is unassigned in iproute2's rt_protos
# (0-4 are the kernel's, the named daemons use 8-18, 42, 99 and 186-192) and differs from the
# reference flanneld's "proto boot" (3). A `replace` still takes over a route to a planned
# subnet whatever its protocol, so routes left by the reference flanneld are adopted.
ROUTE_PROTOCOL = 155
MAIN_TABLE = 254

# rtnetlink message types and flags (linux/rtnetlink.h, linux/netlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x400, 0x300
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE, RTA_NH_ID = 1, 4, 5, 15, 30
NHA_ID, NHA_OIF, NHA_GATEWAY = 1, 5, 6
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT, NTF_SELF = 0x80, 0x02
RTNH_F_ONLINK = 4
RTN_UNICAST, RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 1, 0, 255
AF_BRIDGE = 7

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_NHMSG = struct.Struct("=BBBxI")  # nhmsg: family, scope, protocol, flags
_ATTR = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_U32 = struct.Struct("=I")

BATCH_BYTES = 64 * 1024  # one send; the kernel takes up to the socket's send buffer
RCVBUF = 8 * 1024 * 1024  # dumps of tens of thousands of entries arrive faster than read
ACK_TIMEOUT = 10.0  # s without a reply to a batch of changes: the socket is broken


class RtnlError(OSError):
    """The netlink socket itself failed (not one request: those get their own errno)."""


def _attr(kind: int, payload: bytes) -> bytes:
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, flags: int, body: bytes, seq: int) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, flags, seq, 0) + body


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


# -- requests ---------------------------------------------------------------------------------
def route_request(route: Route, delete: bool, nhid: int = 0) -> tuple[int, int, bytes]:
    """(type, flags, body) of a request that replaces or deletes `route` in the main table
    (through nexthop object `nhid`, if given). A delete names destination, gateway, device and
    protocol, so the kernel never deletes a route that is not ours; scope "nowhere" and type 0
    match any. With `nhid`, a delete names only destination and protocol: it must match our
    route whether it goes through a nexthop object or names its gateway (an older agent's)."""
    dst = route.dst
    scope, rtype = (RT_SCOPE_NOWHERE, 0) if delete else (RT_SCOPE_UNIVERSE, RTN_UNICAST)
    onlink = route.onlink and not delete and not nhid
    body = _RTMSG.pack(
        _family(dst.version), dst.prefixlen, 0, 0, MAIN_TABLE, ROUTE_PROTOCOL, scope, rtype,
        RTNH_F_ONLINK if onlink else 0,
    )  # fmt: skip
    body += _attr(RTA_DST, dst.network_address.packed)
    if nhid and not delete:
        body += _attr(RTA_NH_ID, _U32.pack(nhid))
    elif not nhid:
        if route.gateway is not None:
            body += _attr(RTA_GATEWAY, route.gateway.packed)
        if route.oif:
            body += _attr(RTA_OIF, _U32.pack(route.oif))
    if delete:
        return RTM_DELROUTE, 0, body
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body


# -- nexthop objects --------------------------------------------------------------------------
# The kernel shares one fib_info among IPv4 routes with the same next hop, found through a hash
# that leaves the gateway out: every route via its own gateway on one device lands in one
# chain, walked on each insert, so 10,000 of them took it ~1.5 s (quadratic). A route through a
# nexthop object is hashed by the object's id instead. So an IPv4 route with a gateway goes
# through a nexthop object of ours (protocol 155) whose id comes from its destination: the
# prefix length as the top bit, then the prefix (`nexthop_id`, unique per destination). Dumps
# still show the gateway, device and onlink flag of such a route (nexthop_compat_mode, on by
# default; else they are read from the nexthop). IPv6 keeps one route object per route.
def nexthop_id(route: Route) -> int:
    """The id of the nexthop object `route` goes through; 0 for none (IPv6, no gateway, a
    default or host route)."""
    dst, gateway = route.dst, route.gateway
    if dst.version != 4 or gateway is None or gateway.version != 4:
        return 0
    bits = dst.prefixlen
    if not 0 < bits < 32:
        return 0
    return (1 << bits) | (int(dst.network_address) >> (32 - bits))


def delete_nexthop(nhid: int) -> tuple[int, int, bytes]:
    return (
        RTM_DELNEXTHOP,
        0,
        _NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0) + _attr(NHA_ID, _U32.pack(nhid)),
    )


def nexthop_request(route: Route, nhid: int, delete: bool) -> tuple[int, int, bytes]:
    """Our nexthop object `nhid` replaced by `route`'s gateway, device and onlink flag, or
    deleted."""
    if delete:
        return delete_nexthop(nhid)
    assert route.gateway is not None
    flags = RTNH_F_ONLINK if route.onlink else 0
    body = _NHMSG.pack(socket.AF_INET, 0, ROUTE_PROTOCOL, flags)
    body += _attr(NHA_ID, _U32.pack(nhid)) + _attr(NHA_OIF, _U32.pack(route.oif))
    body += _attr(NHA_GATEWAY, route.gateway.packed)
    return RTM_NEWNEXTHOP, NLM_F_CREATE | NLM_F_REPLACE, body


def neigh_request(neigh: Neigh, delete: bool) -> tuple[int, int, bytes]:
    """A permanent ARP/NDP entry replaced, or deleted."""
    family = _family(neigh.dst.version)
    body = _NDMSG.pack(family, neigh.ifindex, 0 if delete else NUD_PERMANENT, 0, 0)
    body += _attr(NDA_DST, neigh.dst.packed)
    if delete:
        return RTM_DELNEIGH, 0, body
    return RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body + _attr(NDA_LLADDR, _mac(neigh.lladdr))


def fdb_request(fdb: Fdb, delete: bool) -> tuple[int, int, bytes]:
    """An FDB entry of a VXLAN device (MAC → remote), replaced (which moves an existing
    entry of this MAC to the new remote) or deleted."""
    body = _NDMSG.pack(AF_BRIDGE, fdb.ifindex, 0 if delete else NUD_PERMANENT, NTF_SELF, 0)
    body += _attr(NDA_LLADDR, _mac(fdb.lladdr)) + _attr(NDA_DST, fdb.dst.packed)
    if delete:
        return RTM_DELNEIGH, 0, body
    return RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body


_REQUESTS = {"route": route_request, "arp": neigh_request, "fdb": fdb_request}


def request(entry: Entry, delete: bool) -> tuple[int, int, bytes]:
    return _REQUESTS[entry.kind](entry, delete)


# From this many peers on, a new IPv4 route with a gateway goes through a nexthop object of its
# own: below it, inserting plain routes costs the kernel little (the shared fib_info chain is
# quadratic: ~15 ms at 1,000 routes, 1.3-1.6 s at 10,000), and plain routes are what other
# tools expect (`ip route flush` replays a dumped route, gateway and nexthop id together, which
# the kernel refuses; the reference's delete names the gateway, which misses such a route).
NEXTHOP_MIN = 2_000


def requests(
    entry: Entry, delete: bool, foreign: Set[int] = frozenset()
) -> list[tuple[int, int, bytes]]:
    """What installs or removes `entry`: one request, or for a route through a nexthop object
    two (the object, then the route; the route, then the object). An id that is `foreign`
    (someone else's nexthop object holds it) is left alone: that route names its gateway."""
    if entry.kind == "route":
        nhid = nexthop_id(entry)  # type: ignore[arg-type]
        if nhid and nhid not in foreign:
            hop = nexthop_request(entry, nhid, delete)  # type: ignore[arg-type]
            route = route_request(entry, delete, nhid)  # type: ignore[arg-type]
            return [route, hop] if delete else [hop, route]
    return [request(entry, delete)]


# A dump is parsed against the entries the agent already has (by `ident`): an entry found
# there as it is comes back as that very object, so nothing is built for it.
Known = Mapping[tuple, Entry]
_NONE: Known = {}
Hop = tuple[bytes, int, bool]  # a nexthop object's gateway, device and onlink flag


class _Every(frozenset):
    def __contains__(self, item: object) -> bool:
        return True


EVERY_ID: Set[int] = _Every()
_NO_HOPS: Mapping[int, Hop] = {}


# -- replies ----------------------------------------------------------------------------------
def messages(data: bytes) -> Iterator[tuple[int, int, int, memoryview]]:
    """(type, flags, seq, body) of each message in one receive."""
    view, at = memoryview(data), 0
    while at + _HDR.size <= len(data):
        size, kind, flags, seq, _ = _HDR.unpack_from(data, at)
        if size < _HDR.size:
            break
        yield kind, flags, seq, view[at + _HDR.size : at + size]
        at += (size + 3) & ~3


def attrs(body: memoryview, at: int) -> dict[int, memoryview]:
    """The top-level attributes of a message body from offset `at` (nested ones unread)."""
    out: dict[int, memoryview] = {}
    end = len(body)
    while at + _ATTR.size <= end:
        size, kind = _ATTR.unpack_from(body, at)
        if size < _ATTR.size:
            break
        out[kind & 0x3FFF] = body[at + _ATTR.size : at + size]
        at += (size + 3) & ~3
    return out


def parse_route(
    body: memoryview,
    known: Known = _NONE,
    hops: Mapping[int, Hop] = _NO_HOPS,
    used: set[int] | None = None,
) -> Route | None:
    """An RTM_NEWROUTE of the main table with our protocol, as a Route (the one in `known` with
    the same ident, if any); else None. A route through a nexthop object shown without its
    gateway takes gateway, device and onlink flag from `hops` (our objects, by id). The id of
    the nexthop object any route goes through, whoever's, is added to `used`."""
    family, dst_len, _, _, table, proto, _, _, flags = _RTMSG.unpack_from(body)
    if proto != ROUTE_PROTOCOL and used is None:
        return None
    a = attrs(body, _RTMSG.size)
    if used is not None and RTA_NH_ID in a:
        used.add(_U32.unpack(a[RTA_NH_ID])[0])
    if proto != ROUTE_PROTOCOL:
        return None
    if RTA_TABLE in a:
        table = _U32.unpack(a[RTA_TABLE])[0]
    if table != MAIN_TABLE:
        return None
    dst = a.get(RTA_DST)
    raw = bytes(dst) if dst is not None else bytes(4 if family == socket.AF_INET else 16)
    gateway = a.get(RTA_GATEWAY)
    gw = bytes(gateway) if gateway is not None else b""
    oif = _U32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else 0
    onlink = bool(flags & RTNH_F_ONLINK)
    if gateway is None and RTA_NH_ID in a:
        gw, oif, onlink = hops.get(_U32.unpack(a[RTA_NH_ID])[0], (b"", 0, False))
    ident = route_ident(route_slot(raw_key(raw), dst_len), raw_key(gw) if gw else -1, oif, onlink)
    seen = known.get(ident)
    if seen is not None:
        return seen  # type: ignore[return-value]
    net_cls = IPv4Network if family == socket.AF_INET else IPv6Network
    return Route(net_cls((raw, dst_len)), ip_address(gw) if gw else None, oif, onlink)


def parse_nexthop(body: memoryview) -> tuple[int, int, Hop | None]:
    """(id, protocol, (gateway, device, onlink)) of a nexthop object; no hop for a group or
    blackhole."""
    _, _, proto, flags = _NHMSG.unpack_from(body)
    a = attrs(body, _NHMSG.size)
    nhid = _U32.unpack(a[NHA_ID])[0] if NHA_ID in a else 0
    if NHA_GATEWAY not in a or NHA_OIF not in a:
        return nhid, proto, None
    return (
        nhid,
        proto,
        (bytes(a[NHA_GATEWAY]), _U32.unpack(a[NHA_OIF])[0], bool(flags & RTNH_F_ONLINK)),
    )


def _mac_text(raw: memoryview) -> str:
    return bytes(raw).hex(":")


def parse_neigh(body: memoryview, ifindex: int, known: Known = _NONE) -> Neigh | None:
    """A permanent neighbour on `ifindex`, as a Neigh (the one in `known`, if any); else None."""
    _, index, state, _, _ = _NDMSG.unpack_from(body)
    if index != ifindex or not state & NUD_PERMANENT:
        return None
    a = attrs(body, _NDMSG.size)
    if NDA_DST not in a or NDA_LLADDR not in a:
        return None
    dst, mac = bytes(a[NDA_DST]), _mac_text(a[NDA_LLADDR])
    seen = known.get((neigh_slot(ifindex, raw_key(dst)), mac))
    return seen if seen is not None else Neigh(ifindex, ip_address(dst), mac)  # type: ignore[return-value]


def parse_fdb(body: memoryview, ifindex: int, known: Known = _NONE) -> Fdb | None:
    """A permanent FDB entry of `ifindex` sending a unicast MAC to a remote; else None (the
    all-zeros and multicast flooding entries are someone else's)."""
    _, index, state, _, _ = _NDMSG.unpack_from(body)
    if index != ifindex or not state & NUD_PERMANENT:
        return None
    a = attrs(body, _NDMSG.size)
    mac, dst = a.get(NDA_LLADDR), a.get(NDA_DST)
    if mac is None or dst is None or len(mac) != 6 or mac[0] & 1 or not any(mac):
        return None
    text, raw = _mac_text(mac), bytes(dst)
    seen = known.get((fdb_slot(ifindex, text), raw_key(raw)))
    return seen if seen is not None else Fdb(ifindex, text, ip_address(raw))  # type: ignore[return-value]


# -- the socket -------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def _in_netns(name: str | None) -> Iterator[None]:
    """Run the body with this thread inside the named network namespace (tests), then back."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)  # FileNotFoundError: no such netns
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {name}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)


class Rtnl:
    """One rtnetlink socket (in the named `netns`, else this process's namespace)."""

    def __init__(self, netns: str | None = None) -> None:
        with _in_netns(netns):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, 33, RCVBUF)  # SO_RCVBUFFORCE (root)
        except OSError:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self._sock.bind((0, 0))
        self._sock.setblocking(False)
        self._seq = 0
        self._lock = asyncio.Lock()
        self.foreign: Set[int] = set()  # ids of nexthop objects that are not ours
        # our nexthop objects at the last IPv4 route dump, and the ids the routes dumped
        # since then go through (any route's: deleting an object deletes its routes)
        self.our_hops: set[int] = set()
        self.used_hops: set[int] = set()
        # whether new IPv4 gateway routes go through nexthop objects (`NEXTHOP_MIN`)
        self.nexthops = False

    def close(self) -> None:
        self._sock.close()

    def _next(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    async def _recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.sock_recv(self._sock, 1 << 20)

    async def _dump(self, kind: int, body: bytes) -> list[memoryview]:
        """Every message of one dump; redone when the kernel says it was interrupted."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                seq = self._next()
                await loop.sock_sendall(
                    self._sock, _message(kind, NLM_F_REQUEST | NLM_F_DUMP, body, seq)
                )
                out: list[memoryview] = []
                interrupted = False
                done = False
                while not done:
                    for mtype, flags, mseq, mbody in messages(await self._recv()):
                        if mseq != seq:
                            continue
                        interrupted |= bool(flags & NLM_F_DUMP_INTR)
                        if mtype == NLMSG_DONE:
                            done = True
                        elif mtype == NLMSG_ERROR:
                            code = -_ERR.unpack_from(mbody)[0]
                            raise RtnlError(code, f"netlink dump failed: {os.strerror(code)}")
                        else:
                            out.append(mbody)
                if not interrupted:
                    return out

    async def dump_nexthops(self) -> dict[int, Hop]:
        """Our nexthop objects, by id; notes the ids others hold (`foreign`)."""
        ours: dict[int, Hop] = {}
        foreign: set[int] = set()
        try:
            found = await self._dump(RTM_GETNEXTHOP, _NHMSG.pack(socket.AF_UNSPEC, 0, 0, 0))
        except RtnlError as e:  # a kernel without nexthop objects (before 5.3)
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EAFNOSUPPORT):
                raise
            self.foreign = EVERY_ID  # every route names its gateway
            return ours
        for msg in found:
            nhid, proto, hop = parse_nexthop(msg)
            if proto == ROUTE_PROTOCOL and hop is not None:
                ours[nhid] = hop
            else:
                foreign.add(nhid)
        self.foreign = foreign
        self.our_hops, self.used_hops = set(ours), set()
        return ours

    async def dump_routes(
        self, version: int = 4, oif: int | None = None, known: Known = _NONE
    ) -> set[Route]:
        """The main table's routes with our protocol (IPv4, or IPv6 with `version` 6),
        optionally on one device. An IPv4 dump reads the nexthop objects first (kept for the
        dump only: a route names its gateway in it unless nexthop_compat_mode is off)."""
        hops = await self.dump_nexthops() if version == 4 else _NO_HOPS
        body = _RTMSG.pack(_family(version), 0, 0, 0, 0, 0, 0, 0, 0)
        routes = set()
        for msg in await self._dump(RTM_GETROUTE, body):
            route = parse_route(msg, known, hops, self.used_hops)
            if route is not None and (oif is None or route.oif == oif):
                routes.add(route)
        return routes

    async def dump_neighs(self, ifindex: int, version: int = 4, known: Known = _NONE) -> set[Neigh]:
        body = _NDMSG.pack(_family(version), 0, 0, 0, 0)
        found = (parse_neigh(m, ifindex, known) for m in await self._dump(RTM_GETNEIGH, body))
        return {n for n in found if n is not None}

    async def dump_fdb(self, ifindex: int, known: Known = _NONE) -> set[Fdb]:
        body = _NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)
        found = (parse_fdb(m, ifindex, known) for m in await self._dump(RTM_GETNEIGH, body))
        return {f for f in found if f is not None}

    async def run(self, requests: Iterable[tuple[int, int, bytes]]) -> list[int]:
        """Send every request, pipelined in batches, each acknowledged; the errno of each (0:
        done), in order. A request's failure is its own; the others go on.

        The kernel does the work of a request inside the send (inserting 10,000 routes with
        distinct gateways takes it over a second), so the sends and receives run in a worker
        thread, which holds no GIL meanwhile: the event loop goes on reading etcd."""
        async with self._lock:
            batches: list[tuple[bytes, list[int]]] = []  # (one send, the seqs in it)
            batch: list[bytes] = []
            seqs: list[int] = []
            size = 0
            for kind, flags, body in requests:
                seq = self._next()
                msg = _message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body, seq)
                batch.append(msg)
                seqs.append(seq)
                size += len(msg)
                if size >= BATCH_BYTES:
                    batches.append((b"".join(batch), seqs))
                    batch, seqs, size = [], [], 0
            if batch:
                batches.append((b"".join(batch), seqs))
            exchange = asyncio.ensure_future(asyncio.to_thread(self._exchange, batches))
            try:
                return await asyncio.shield(exchange)
            except asyncio.CancelledError:
                # a thread cannot be stopped: the socket stays locked until it is done with it
                with contextlib.suppress(Exception):
                    await exchange
                raise

    def _exchange(self, batches: list[tuple[bytes, list[int]]]) -> list[int]:
        """Each batch sent, then its acknowledgements read (blocking: in a worker thread)."""
        results: list[int] = []
        self._sock.settimeout(ACK_TIMEOUT)
        try:
            for data, seqs in batches:
                pending = {seq: len(results) + i for i, seq in enumerate(seqs)}
                results.extend([errno.EINPROGRESS] * len(seqs))
                self._sock.sendall(data)
                while pending:
                    for mtype, _, seq, mbody in messages(self._sock.recv(1 << 20)):
                        if mtype == NLMSG_ERROR and seq in pending:
                            results[pending.pop(seq)] = -_ERR.unpack_from(mbody)[0]
        except TimeoutError:
            raise RtnlError(errno.ETIMEDOUT, "no acknowledgement from the kernel") from None
        finally:
            self._sock.setblocking(False)
        return results
