"""The udp kernel fast path's I/O: bpf(2) through ctypes, and the tc (clsact, cls_bpf
direct-action) attachment through pyroute2. What goes into the maps is `kplan`'s.

`KernelPath.open()` creates the maps, loads both programs (bpfcode's words: no compiler here)
and attaches egress to flannel0 and ingress to the underlay NIC; any failure (no BPF, a
verifier refusal, an old kernel) raises `KernelUnavailable` with the reason, having undone
what it did. The ingress filter is a cls_bpf filter of fixed priority `PRIO` and handle
`HANDLE` (named `NAME`) on the underlay's clsact ingress: `replace` puts ours over a stale one
of a SIGKILLed agent, and nothing else on the NIC is touched; the clsact qdisc is only deleted
when this agent added it and no filter is left on it. flannel0's programs vanish with the
device (the TUN fd); on a re-created flannel0, `attach_egress` attaches again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from ipaddress import IPv4Address, IPv4Network

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import netlink
from . import bpfcode
from .core import Routes
from .kplan import (
    CONFIG_SIZE,
    MAX_ROUTES,
    ROUTE_KEY_SIZE,
    ROUTE_VALUE_SIZE,
    STATS_SLOTS,
    changes,
    config_value,
    kernel_too_old,
    patch_map_fds,
    route_entries,
    stats_values,
)

PRIO = 8285  # the ingress filter's tc priority and handle: distinctive, fixed across restarts
HANDLE = 0xF1A0
NAME = "flannel_udp_in"
INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress
EGRESS_PARENT = 0xFFFFFFF3

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD = 5
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LPM_TRIE = 2, 11
BPF_F_NO_PREALLOC = 1
BPF_PROG_TYPE_SCHED_CLS = 3
_ATTR_SIZE = 128

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class KernelUnavailable(Exception):
    """The fast path cannot run here; the message says why."""


def _bpf(cmd: int, attr: bytes) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) number unknown for {platform.machine()}")
    buf = ctypes.create_string_buffer(attr.ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    r = _libc.syscall(nr, cmd, buf, _ATTR_SIZE)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bpf({cmd}): {os.strerror(e)}")
    return int(r)


class Map:
    def __init__(self, mtype: int, ksz: int, vsz: int, n: int, flags: int, name: bytes) -> None:
        self.ksz, self.vsz = ksz, vsz
        attr = struct.pack("<IIIIIII16s", mtype, ksz, vsz, n, flags, 0, 0, name[:15])
        self.fd = _bpf(BPF_MAP_CREATE, attr)

    def _call(self, cmd: int, key: bytes, value: ctypes.Array | None) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.addressof(value) if value is not None else 0
        _bpf(cmd, struct.pack("<IIQQQ", self.fd, 0, ctypes.addressof(k), v, 0))

    def update(self, key: bytes, value: bytes) -> None:
        self._call(BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, len(value)))

    def delete(self, key: bytes) -> None:
        try:
            self._call(BPF_MAP_DELETE_ELEM, key, None)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def lookup(self, key: bytes) -> bytes:
        v = ctypes.create_string_buffer(self.vsz)
        self._call(BPF_MAP_LOOKUP_ELEM, key, v)
        return v.raw

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def load_program(
    insns: tuple[int, ...], relocs: tuple[tuple[int, str], ...], fds: dict[str, int], name: bytes
) -> int:
    """BPF_PROG_LOAD of a SCHED_CLS program; OSError with the verifier's log on refusal."""
    blob = patch_map_fds(insns, relocs, fds)
    ib = ctypes.create_string_buffer(blob, len(blob))
    lic = ctypes.create_string_buffer(b"GPL")
    logbuf = ctypes.create_string_buffer(1 << 18)

    def attr(level: int) -> bytes:
        return struct.pack(
            "<IIQQIIQII16s",
            BPF_PROG_TYPE_SCHED_CLS,
            len(blob) // 8,
            ctypes.addressof(ib),
            ctypes.addressof(lic),
            level,
            len(logbuf) if level else 0,
            ctypes.addressof(logbuf) if level else 0,
            0,
            0,
            name[:15],
        )

    try:
        return _bpf(BPF_PROG_LOAD, attr(0))
    except OSError as e:
        try:
            fd = _bpf(BPF_PROG_LOAD, attr(1))  # for the verifier's log
            os.close(fd)
        except OSError:
            pass
        tail = logbuf.value.decode(errors="replace").strip().splitlines()[-3:]
        raise OSError(e.errno, f"{e.strerror}; verifier: {' | '.join(tail)}") from None


async def _ifindex(ipr: AsyncIPRoute, name: str) -> int:
    found = await ipr.link_lookup(ifname=name)
    if not found:
        raise OSError(errno.ENODEV, f"no device {name}")
    return int(found[0])


async def _add_clsact(ipr: AsyncIPRoute, index: int) -> bool:
    """Add the clsact qdisc; False when there was one already."""
    try:
        await ipr.tc("add", "clsact", index)
        return True
    except NetlinkError as e:
        if e.code == errno.EEXIST:
            return False
        raise


async def _attach(ipr: AsyncIPRoute, index: int, fd: int, parent: int, name: str) -> None:
    await ipr.tc(
        "replace-filter",
        "bpf",
        index,
        HANDLE,
        fd=fd,
        name=name,
        parent=parent,
        prio=PRIO,
        direct_action=True,
    )


def _ours(f: object) -> bool:
    get = getattr(f, "get", None)
    if get is None:
        return False
    return get("info", 0) >> 16 == PRIO and get("handle") == HANDLE and get("kind") == "bpf"


async def remove_filter(
    ipr: AsyncIPRoute, index: int, parent: int = INGRESS_PARENT, drop_clsact: bool = False
) -> bool:
    """Delete our filter from device `index`'s clsact `parent` (True when there was one); then
    the clsact qdisc too if `drop_clsact` and no filter at all is left on it."""
    found = False
    try:
        filters = [f async for f in await ipr.get_filters(index=index, parent=parent)]
    except NetlinkError:
        return False
    if any(_ours(f) for f in filters):
        try:
            await ipr.tc("del-filter", "bpf", index, HANDLE, parent=parent, prio=PRIO)
            found = True
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise
    if drop_clsact:
        left = [
            f
            for parent in (INGRESS_PARENT, EGRESS_PARENT)
            async for f in await ipr.get_filters(index=index, parent=parent)
            if f.get("kind")
        ]
        if not left:
            with contextlib.suppress(NetlinkError):
                await ipr.tc("del", "clsact", index)
    return found


async def cleanup_ingress_filters(netns: str | None = None) -> list[str]:
    """`flannelctl cleanup`: our ingress filter off every device of this namespace."""
    done = []
    async with netlink.open_ipr(netns) as ipr:
        async for link in await ipr.link("dump"):
            if await remove_filter(ipr, link["index"]):
                done.append(f"tc ingress filter {NAME} on {link.get_attr('IFLA_IFNAME')}")
    return done


class KernelPath:
    """The loaded programs, their maps, and what they are attached to."""

    def __init__(self) -> None:
        self.maps: dict[str, Map] = {}
        self.progs: dict[str, int] = {}
        self.eth_index = 0
        self.tun_index = 0
        self._added_clsact = False
        self._routes: dict[bytes, bytes] = {}
        self._config = b""

    @classmethod
    async def open(cls, tun: str, eth_index: int) -> KernelPath:
        if why := kernel_too_old(os.uname().release):
            raise KernelUnavailable(why)
        k = cls()
        try:
            k._load()
            k.eth_index = eth_index
            await k.attach_egress(tun)
            async with netlink.open_ipr() as ipr:
                k._added_clsact = await _add_clsact(ipr, eth_index)
                await _attach(ipr, eth_index, k.progs["ingress"], INGRESS_PARENT, NAME)
        except (OSError, NetlinkError, ValueError) as e:
            await k.close()
            raise KernelUnavailable(str(e) or type(e).__name__) from None
        return k

    def _load(self) -> None:
        self.maps["cfg_map"] = Map(BPF_MAP_TYPE_ARRAY, 4, CONFIG_SIZE, 1, 0, b"flannel_cfg")
        self.maps["route_map"] = Map(
            BPF_MAP_TYPE_LPM_TRIE,
            ROUTE_KEY_SIZE,
            ROUTE_VALUE_SIZE,
            MAX_ROUTES,
            BPF_F_NO_PREALLOC,
            b"flannel_routes",
        )
        self.maps["stats_map"] = Map(BPF_MAP_TYPE_ARRAY, 4, 8, STATS_SLOTS, 0, b"flannel_stats")
        fds = {name: m.fd for name, m in self.maps.items()}
        for prog, insns, relocs in (
            ("egress", bpfcode.EGRESS_INSNS, bpfcode.EGRESS_MAP_RELOCS),
            ("ingress", bpfcode.INGRESS_INSNS, bpfcode.INGRESS_MAP_RELOCS),
        ):
            self.progs[prog] = load_program(insns, relocs, fds, f"flannel_{prog}".encode())

    async def attach_egress(self, tun: str) -> None:
        """Attach the egress program to (a new) `tun`; the config follows at the next sync."""
        async with netlink.open_ipr() as ipr:
            index = await _ifindex(ipr, tun)
            await _add_clsact(ipr, index)
            await _attach(ipr, index, self.progs["egress"], EGRESS_PARENT, "flannel_udp_out")
        self.tun_index = index

    def sync(self, routes: Routes, local_ip: IPv4Address, port: int) -> None:
        """Make the maps match this snapshot: config, then routes (deletions first)."""
        subnet: IPv4Network = routes.local
        cfg = config_value(local_ip, subnet, self.eth_index, self.tun_index, port)
        if cfg != self._config:
            self.maps["cfg_map"].update(b"\0\0\0\0", cfg)
            self._config = cfg
        new = route_entries(routes)
        updates, deletes = changes(self._routes, new)
        rmap = self.maps["route_map"]
        for key in deletes:
            rmap.delete(key)
            del self._routes[key]
        for key, value in updates.items():
            rmap.update(key, value)
            self._routes[key] = value

    def stats(self) -> dict[str, int]:
        m = self.maps.get("stats_map")
        if m is None or m.fd < 0:
            return {}
        raw = [struct.unpack("<Q", m.lookup(struct.pack("<I", i)))[0] for i in range(STATS_SLOTS)]
        return stats_values(raw)

    def route_keys(self) -> set[bytes]:
        return set(self._routes)

    async def close(self) -> None:
        """Detach both filters (flannel0's would go with the device anyway); close programs
        and maps."""
        if self.progs:
            try:
                async with netlink.open_ipr() as ipr:
                    if self.tun_index:
                        await remove_filter(ipr, self.tun_index, EGRESS_PARENT)
                    if self.eth_index:
                        await remove_filter(ipr, self.eth_index, INGRESS_PARENT, self._added_clsact)
            except (OSError, NetlinkError):
                pass
        for fd in self.progs.values():
            os.close(fd)
        self.progs.clear()
        for m in self.maps.values():
            m.close()
        self.maps.clear()
