"""The udp backend: the agent itself carries each container packet inside a UDP datagram.

Kernel side: the TUN device `flannel0` (`<subnet network address>/32`, MTU = underlay MTU − 28)
and one route for the whole cluster network through it (proto 155); the device exists only
while the agent runs, so udp traffic stops with the agent (a restarted agent carries it again
as soon as it is ready). Packets move in `datapath`'s thread; the decisions are pure, one
module per concern: `core` (routes, admission, ICMP), `ipv4` (header arithmetic), `vnet` (the
virtio-net header), `layouts` (send and receive buffers), `tso` (cutting super-packets),
`trains`, `runs` (joining GRO batches), `egress` (what one TUN read becomes) and `receiver`
(the receive state machine). Datagrams are accepted only from a peer's PublicIP and the
backend Port, holding one valid IPv4 packet from that peer's subnet to ours; the rest is
dropped, counted by reason (`UdpBackend.drops`) and reported in one log line per reconcile pass.

On the wire a datagram is one inner IPv4 packet, as with the reference, or between two nodes
of this agent a chunk of a train (README, udp options). The lease record is the reference's
(PublicIP only, no BackendType) plus `"BackendData": {"Cap": ["csum", "train"]}` when the TUN
has a virtio-net header: peers that advertise `csum` get TCP/UDP checksums left for their
kernel to finish, peers that advertise `train` too get TCP super-packets as trains; the
reference ignores BackendData and gets every packet whole with its checksums finished.

Options (`Backend` object, keys in any case): `Port`, the UDP port on every node (default 8285).
The environment variable FLANNELD_UDP_OFFLOAD=false makes one node run as the reference does:
plain TUN, one packet per system call, no capability advertised.

Kernel fast path (`kplan`, `kernel`, the programs in bpf/flannel_tc.c): where the kernel allows
it, two tc eBPF programs carry the traffic instead of the thread: egress on flannel0
encapsulates a packet whose destination a peer holds and sends it out of the underlay NIC,
ingress on the underlay NIC checks a datagram against every admission rule above and delivers
the inner packet to flannel0. Whatever they do not take (no peer: ICMP unreachable; TTL; IP
options; non-TCP GSO; any datagram failing a rule, which userspace then drops and counts) goes
the userspace way. One log line at start says which datapath runs. FLANNELD_UDP_KERNEL=false
turns the fast path off; a kernel that cannot load or attach it (no BPF, old kernel) gets the
userspace path with the reason logged (kernels before 6.3 are not tried). While it runs the
lease advertises no `Cap` but `{"Datapath": "kernel"}`: the fast path delivers
reference-format datagrams only, so peers (ours in userspace too) send it whole packets with
finished checksums, one per datagram, and the node's own userspace path sends as the
reference does too (`plan(caps=False)`: a peer treats a sender without `csum` as the
reference and writes what it sends as it came). The kernel encapsulates only to peers that
advertise `Datapath: kernel`; to the others packets go through userspace (see `kplan`).
The ingress filter is removed on close and by `flannelctl cleanup` (`cleanup`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import Counter
from collections.abc import Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flanneld.core.config import ci_get, int_field
from flanneld.core.lease import Lease, LeaseAttrs
from flanneld.core.options import FlagError, parse_bool

from .. import netlink
from ..base import Backend, BackendContext, BackendError, ReconcileResult, skip_reason
from ..reconcile import Route, diff
from ..registry import register
from ..rtnl import Rtnl
from .core import (
    CAP_PARTIAL_CSUM,
    CAP_TRAIN,
    DATAPATH_KERNEL,
    DATAPATH_KEY,
    DEFAULT_PORT,
    ENCAP_OVERHEAD,
    Drop,
    Peer,
    Routes,
)
from .datapath import Datapath, open_socket, open_tun
from .kernel import KernelPath, KernelUnavailable, cleanup_ingress_filters
from .kplan import KERNEL_ENV, KernelSetting, kernel_wanted

log = logging.getLogger(__name__)

TYPE = "udp"
DEVICE = "flannel0"
OFFLOAD_ENV = "FLANNELD_UDP_OFFLOAD"


def parse_port(options: Mapping[str, Any]) -> int:
    """The backend's `Port` option (any case), default 8285 (also for 0 and null)."""
    return int_field(dict(options), "Port", 0, 65535, "Backend.") or DEFAULT_PORT


def offload_wanted(environ: Mapping[str, str]) -> bool:
    try:
        return parse_bool(environ.get(OFFLOAD_ENV, "true"))
    except FlagError as e:
        raise BackendError(f"{OFFLOAD_ENV}: {e}") from None


def advertised(backend_data: Any, cap: str) -> bool:
    """BackendData `{"Cap": [...]}` (keys in any case) names `cap`."""
    caps = ci_get(backend_data, "Cap") if isinstance(backend_data, dict) else None
    return isinstance(caps, list) and cap in caps


def runs_kernel(backend_data: Any) -> bool:
    """BackendData `{"Datapath": "kernel"}` (key in any case): the peer runs the fast path."""
    value = ci_get(backend_data, DATAPATH_KEY) if isinstance(backend_data, dict) else None
    return value == DATAPATH_KERNEL


def plan(
    local: Lease,
    peers: Mapping[IPv4Network, Lease],
    network: IPv4Network,
    subnet_len: int,
    port: int,
    caps: bool = True,
) -> tuple[Routes, list[str]]:
    """The datapath's snapshot for these peers, and one warning per peer skipped. `caps`:
    this node advertises its own; without them it must send as the reference does (whole
    packets, finished checksums) whatever peers advertise, because a peer treats a sender
    without `csum` as the reference and writes what it sends as it came.

    Skipped: our own subnet, a lease claiming our PublicIP, a lease of another backend type
    (the reference's udp writes none; "udp" is accepted too)."""
    chosen: list[Peer] = []
    warnings: list[str] = []
    for subnet, peer in sorted(peers.items()):
        if why := skip_reason(local, subnet, peer, ("", TYPE)):
            warnings.append(why)
        else:
            data = peer.attrs.backend_data
            partial = caps and advertised(data, CAP_PARTIAL_CSUM)
            train = partial and advertised(data, CAP_TRAIN)
            kernel = runs_kernel(data)
            chosen.append(Peer(subnet, peer.attrs.public_ip, port, partial, train, kernel))
    return Routes(network, subnet_len, local.subnet, chosen, port), warnings


def drops_summary(now: Counter[Drop], before: Counter[Drop]) -> str:
    """ "3 sender is not a peer, 1 TTL expired" for the drops counted since `before`."""
    delta = now - before
    return ", ".join(f"{n} {reason.value}" for reason, n in delta.most_common())


# the datapath's own counters, in the metrics as they are
DATAPATH_COUNTS = ("packets_in", "packets_out", "bytes_in", "bytes_out", "trains_in", "trains_out")


@register(TYPE)
class UdpBackend(Backend):
    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> int:
        return parse_port(options)

    @classmethod
    def owned_devices(cls) -> tuple[tuple[str, str], ...]:
        return (("tun", r"flannel\d+"),)

    @classmethod
    async def cleanup(cls, netns: str | None = None) -> list[str]:
        """The fast path's ingress filter, left on the underlay NIC by a killed agent."""
        return await cleanup_ingress_filters(netns)

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.port = DEFAULT_PORT
        self.vnet = False
        self._tun: int | None = None
        self._sock: socket.socket | None = None
        self._datapath: Datapath | None = None
        self._ipr: AsyncIPRoute | None = None
        self._rtnl: Rtnl | None = None
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        self._desired: set[Route] = set()
        self._drops_logged: Counter[Drop] = Counter()
        # counts of datapaths that ended with a deleted flannel0: the metrics are counters,
        # and a re-created datapath starts from zero
        self._retired: Counter[str] = Counter()
        self._retired_drops: Counter[Drop] = Counter()
        self.recreations = 0
        self._kernel: KernelPath | None = None
        self._kernel_failed = False
        self._caps = False  # the lease advertises Cap (prepare)
        self._kernel_retired: dict[str, int] = {}  # counts of a fast path given up on

    @property
    def mtu(self) -> int:
        return self.ctx.ext.mtu - ENCAP_OVERHEAD

    @property
    def drops(self) -> Counter[Drop]:
        """Packets dropped by the datapath so far, by reason."""
        now = Counter(self._datapath.drops) if self._datapath else Counter()
        return now + self._retired_drops

    def stats(self) -> dict[str, int]:
        """Datagrams and bytes in/out and drops by reason, for the metrics endpoint."""
        dp = self._datapath
        if dp is None:
            return {}
        out = {key: getattr(dp, key) + self._retired[key] for key in DATAPATH_COUNTS}
        out.update({f"drop:{d.name.lower()}": n for d, n in self.drops.items()})
        out["device_recreations"] = self.recreations
        out.update(self._kernel.stats() if self._kernel is not None else self._kernel_retired)
        return out

    # -- devices -----------------------------------------------------------------------------
    def _open_tun(self, vnet: bool) -> None:
        try:
            self._tun = open_tun(DEVICE, vnet)
            self.vnet = vnet
            # IPv4 only: no IPv6 neighbour discovery or MLD chatter into the datapath
            with contextlib.suppress(OSError):
                Path(f"/proc/sys/net/ipv6/conf/{DEVICE}/disable_ipv6").write_text("1")
        except OSError as e:
            if vnet and e.errno == errno.EINVAL:
                log.warning("TUN offloads not supported here (%s); one packet per datagram", e)
                self._open_tun(False)
                return
            hint = {
                errno.EBUSY: f"another process holds {DEVICE} (another flanneld?); stop it",
                errno.ENOENT: "load the tun module (modprobe tun)",
                errno.EPERM: "run as root or with CAP_NET_ADMIN",
                errno.EACCES: "run as root or with CAP_NET_ADMIN",
            }.get(e.errno or 0, "check /dev/net/tun and the tun module")
            raise BackendError(f"cannot create TUN device {DEVICE}: {e.strerror}; {hint}") from None

    def _open_socket(self) -> None:
        ext = self.ctx.ext
        try:
            self._sock = open_socket(str(ext.iface_addr), self.port, self.vnet)
        except OSError as e:
            raise BackendError(
                f"cannot listen on UDP {ext.iface_addr}:{self.port} ({e.strerror}); "
                "stop whatever uses the port or set Backend.Port"
            ) from None

    async def prepare(self) -> LeaseAttrs:
        self.port = parse_port(self.ctx.options)
        try:
            kernel = kernel_wanted(os.environ)
        except KernelSetting as e:
            raise BackendError(str(e)) from None
        self._open_tun(offload_wanted(os.environ))
        self._open_socket()
        if kernel:
            await self._open_kernel()
        else:
            log.info("udp datapath: userspace (%s=false)", KERNEL_ENV)
        # the fast path delivers whole reference-format packets only: no capability then
        data: dict[str, Any] | None = None
        if self._kernel is not None:
            data = {DATAPATH_KEY: DATAPATH_KERNEL}
        elif self.vnet:
            data = {"Cap": [CAP_PARTIAL_CSUM, CAP_TRAIN]}
        self._caps = data is not None and "Cap" in data
        return LeaseAttrs(public_ip=self.ctx.ext.ext_addr, backend_data=data)

    async def _open_kernel(self) -> None:
        ext = self.ctx.ext
        try:
            self._kernel = await KernelPath.open(DEVICE, ext.index)
        except KernelUnavailable as e:
            log.warning("udp datapath: userspace (the tc eBPF fast path cannot run here: %s)", e)
            return
        log.info(
            "udp datapath: kernel (tc eBPF) on %s/%s, userspace fallback for the rest",
            DEVICE,
            ext.name,
        )

    def _set_routes(self, routes: Routes) -> None:
        """Hand a new snapshot to the datapath thread and to the fast path's maps."""
        assert self._datapath is not None
        self._datapath.routes = routes
        if self._kernel is not None and not self._kernel_failed:
            try:
                self._kernel.sync(routes, self.ctx.ext.iface_addr, self.port)
            except OSError as e:
                log.error(
                    "udp datapath: cannot update the fast path's maps (%s); userspace only", e
                )
                self._kernel_failed = True

    async def _drop_failed_kernel(self) -> None:
        if self._kernel is not None and self._kernel_failed:
            self._kernel_retired = self._kernel.stats()
            await self._kernel.close()
            self._kernel = None

    def _routes(self, lease: Lease, peers: Mapping[IPv4Network, Lease]) -> Routes:
        config = self.ctx.config
        routes, warnings = plan(
            lease, peers, config.network, config.subnet_len, self.port, self._caps
        )
        for warning in warnings:
            if warning not in self._warned:
                log.warning("%s", warning)
        self._warned = set(warnings)
        return routes

    def _start_datapath(self, routes: Routes) -> None:
        assert self._tun is not None and self._sock is not None
        old = self._datapath
        self._datapath = Datapath(self._tun, self._sock, self.vnet, routes, self.mtu)
        if old is not None:
            self._datapath.drops.update(old.drops)
        self._datapath.start()
        self._set_routes(routes)

    async def intact(self) -> bool:
        """The datapath thread still runs (it ends when flannel0 is deleted)."""
        return self._datapath is None or self._datapath.alive

    async def _heal(self) -> bool:
        """Re-create the TUN device when the datapath died with it (deleted by hand); True
        when it did."""
        dp = self._datapath
        if dp is None or dp.alive:
            return False
        log.warning("udp datapath stopped (%s); re-creating %s", dp.error, DEVICE)
        dp.stop()
        self._retired.update({key: getattr(dp, key) for key in DATAPATH_COUNTS})
        self._retired_drops.update(dp.drops)
        self.recreations += 1
        if self._tun is not None:
            os.close(self._tun)
            self._tun = None
        self._open_tun(self.vnet)
        if self._kernel is not None:
            try:
                await self._kernel.attach_egress(DEVICE)
                log.info("udp datapath: kernel (tc eBPF) fast path re-attached to %s", DEVICE)
            except (OSError, NetlinkError) as e:
                log.warning("udp datapath: cannot re-attach to %s (%s); userspace only", DEVICE, e)
                self._kernel_retired = self._kernel.stats()
                await self._kernel.close()
                self._kernel = None
        self._start_datapath(dp.routes)
        return True

    def _netlink(self) -> AsyncIPRoute:
        if self._ipr is None:
            self._ipr = netlink.open_ipr()
        return self._ipr

    async def _configure_device(self, ipr: AsyncIPRoute, lease: Lease) -> int:
        """`flannel0` with MTU, `<subnet network address>/32` as its only flannel address,
        up; its index."""
        [link] = await ipr.link("get", ifname=DEVICE)
        index = link["index"]
        if link.get("mtu") != self.mtu:
            await ipr.link("set", index=index, mtu=self.mtu)
        await netlink.own_address_up(ipr, link, lease.subnet, self.ctx.config.network)
        return index

    async def _sync_kernel(self, lease: Lease) -> ReconcileResult:
        """Device state and the one network route via it; any other proto-155 route is stale."""
        result = ReconcileResult()
        ipr = self._netlink()
        try:
            index = await self._configure_device(ipr, lease)
            desired = {Route(dst=self.ctx.config.network, gateway=None, oif=index)}
            if self._rtnl is None:
                self._rtnl = Rtnl()
            actual = await self._rtnl.dump_routes()
            done = await netlink.apply(self._rtnl, diff(desired, actual), result)
        except (NetlinkError, OSError):
            await self._close_netlink()  # a broken socket: the next pass opens a fresh one
            raise
        done.report(actual, self._desired, result, lambda r: f"{r.dst} dev {DEVICE}")
        self._desired = desired
        return result

    async def configure(self, lease: Lease) -> None:
        async with self._lock:
            routes = self._routes(lease, {})
            if self._datapath is None:
                self._start_datapath(routes)
            else:
                self._set_routes(routes)
            await self._drop_failed_kernel()
            await self._sync_kernel(lease)

    async def reconcile(
        self, lease: Lease, peers: Mapping[IPv4Network, Lease], full: bool = True
    ) -> ReconcileResult:
        """Swap the datapath's peer table; on a full pass (or after re-creating flannel0)
        also make the device and the network route match."""
        async with self._lock:
            routes = self._routes(lease, peers)
            healed = await self._heal()
            self._set_routes(routes)
            await self._drop_failed_kernel()
            result = await self._sync_kernel(lease) if full or healed else ReconcileResult()
        drops = self.drops
        if drops != self._drops_logged:
            log.info("udp: dropped since last report: %s", drops_summary(drops, self._drops_logged))
            self._drops_logged = drops
        return result

    async def _close_netlink(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None
        if self._rtnl is not None:
            self._rtnl.close()
            self._rtnl = None

    async def close(self) -> None:
        """Stop the datapath and close the TUN fd, which deletes flannel0 and its route; the
        fast path's ingress filter comes off the underlay NIC."""
        if self._kernel is not None:
            await self._kernel.close()
            self._kernel = None
        if self._datapath is not None:
            self._datapath.stop(0.3)
        if self._tun is not None:
            os.close(self._tun)
            self._tun = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        await self._close_netlink()
