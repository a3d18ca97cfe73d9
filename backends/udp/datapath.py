"""The udp backend's I/O: the TUN device, the UDP socket, and the thread that moves packets
between them. Every decision is the pure modules' (`core`, `egress`, and for receives the state
machine `receiver.Receiver`); this module only reads, sends and writes, many kilobytes per
system call where the kernel allows.

One thread does both directions: it sleeps in epoll until the TUN or the socket is readable,
then reads once from each that epoll reports readable, round after round, for as long as
either has something and for `SPIN` s after that (asking epoll without waiting, and yielding
the CPU between empty rounds), before it sleeps again. The next
packet of a burst, or the answer to a request that just went out, is so picked up without a
wake-up, which costs more than the Python work on a small packet (two threads, one per
direction, measured slower: they contend for the GIL and the CPUs). A TUN read takes the
packet in one piece; a super-packet's datagrams are gathered by `sendmsg` from headers built
apart and views of its payload (`layouts.Gather`). A UDP receive goes where the receive
machine says (`Receiver.iov`: a flat buffer, or a `layouts.Scatter` laid out for the segments
or trains it expects); the datapath hands it what came and writes what it answers, and while
the machine holds a run open (state OPEN) receives once more without waiting, for the
continuation. The agent swaps `Datapath.routes` by assignment; the thread reads the attribute
once per read, so each packet sees one whole snapshot.

At low load every packet finds the thread asleep and its code cold (on the lab's 2-vCPU VM a
line of Python after a sleep of milliseconds costs 5-10 times what it does in a burst), so the
common small cases take short ways: a TUN read whose virtio-net header asks for nothing (a ping)
is routed and sent whole without `egress.transmit`, and a single datagram received into the
flat buffer goes to `Receiver.datagram`, which skips the receive table's dispatch.

Whatever a peer sends costs at most what it sent: an exception other than an OSError while
handling one read (a bug met by a packet) drops that read, counted as `internal` in the drop
counters, and the thread goes on with the next; it is logged with its traceback the first
time, then at most once per `INTERNAL_LOG_EVERY` s. An OSError (the TUN device deleted) ends
the thread; the agent re-creates the device and starts a new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import Counter

from .core import Drop, Peer, Reply, Routes
from .egress import transmit
from .ipv4 import Buf
from .layouts import Gathers, Send
from .receiver import OPEN, Receiver
from .vnet import PLAIN, VNET_LEN

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4 = 0x01, 0x02
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SOCKET_BUFFER = 4 << 20

SPIN = 200e-6  # s of polling on after the last packet before sleeping in epoll
INTERNAL_LOG_EVERY = 60.0  # s between two log lines about internal errors (the first: at once)
BUFFER = 1 << 17  # more than a 64 KB super-packet or GRO batch plus its virtio-net header
_ANC = socket.CMSG_SPACE(4)
_GRO_SIZE = struct.Struct("=i")
_MSG_DONTWAIT, _MSG_TRUNC = int(socket.MSG_DONTWAIT), int(socket.MSG_TRUNC)


def _gro_size(anc: list[tuple[int, int, bytes]], n: int) -> int:
    """The segment size of a UDP_GRO receive of n bytes (n when it holds one datagram)."""
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO:
            return _GRO_SIZE.unpack_from(data)[0]
    return n


def open_tun(name: str, vnet: bool) -> int:
    """A non-blocking fd of the new TUN device `name` (IFF_TUN|IFF_NO_PI); with `vnet`, every
    packet carries a virtio-net header and the kernel hands over TCP super-packets (TSO4)
    with partial checksums. The device lives as long as the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        if vnet:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_socket(addr: str, port: int, gro: bool) -> socket.socket:
    """The UDP socket bound to addr:port, with large buffers and, with `gro`, UDP_GRO (one
    receive returns a train of equal-sized datagrams). Sends block; receives never do."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for force, plain in (
            (SO_RCVBUFFORCE, socket.SO_RCVBUF),
            (SO_SNDBUFFORCE, socket.SO_SNDBUF),
        ):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:  # without CAP_NET_ADMIN: capped by net.core.[rw]mem_max
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        sock.bind((addr, port))
        if gro:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class Datapath:
    """The packet-moving thread over an open TUN fd and UDP socket (both stay the caller's).

    `vnet` says the TUN was opened with a virtio-net header: then super-packets are segmented
    into UDP_SEGMENT sends and GRO trains joined into super-packets; without it, one packet
    per system call, as the reference does. `mtu` is the TUN device's."""

    def __init__(self, tun: int, sock: socket.socket, vnet: bool, routes: Routes, mtu: int) -> None:
        self.routes = routes
        self.drops: Counter[Drop] = Counter()
        # datagrams and their bytes, counted per system call (not per packet) for metrics
        self.packets_in = self.packets_out = self.bytes_in = self.bytes_out = 0
        self.error: BaseException | None = None  # what ended the thread, unless stop() did
        self._tun, self._sock, self._sock_fd, self._vnet = tun, sock, sock.fileno(), vnet
        self._egress, self._ingress = (
            (self._egress_vnet, self._ingress_vnet)
            if vnet
            else (self._egress_plain, self._ingress_plain)
        )
        self._vbuf = bytearray(VNET_LEN)
        self._rbuf, self._ubuf = bytearray(BUFFER), bytearray(BUFFER)
        self._rview = memoryview(self._rbuf)
        # TUN reads: [virtio-net header, packet]; a super-packet's segments are gathered
        # from header buffers and views of the packet's payload (`layouts.Gather`)
        self._riov: list[Buf] = [self._vbuf, self._rbuf] if vnet else [self._rbuf]
        self._gathers = Gathers(self._rbuf, mtu)  # a datagram carries up to `mtu` bytes
        # UDP receives go where the receive machine says (without offloads: always `_ubuf`)
        self._receiver = Receiver(mtu, self.drops, self._ubuf)
        self._cmsg_seg, self._cmsg = 0, [(SOL_UDP, UDP_SEGMENT, b"")]
        self._internal_logged_at: float | None = None  # see `_internal_error`
        self._internal_unlogged = 0
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="udp-datapath", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def trains_in(self) -> int:
        """Super-packets received as trains (`trains.train`), whole and valid."""
        return self._receiver.trains.written

    @property
    def trains_out(self) -> int:
        return self._gathers.trains

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 1.0) -> None:
        """End the thread (within `timeout` s unless it is stuck in a send)."""
        self._stopping = True
        with contextlib.suppress(OSError):  # a second stop(): the pipe is closed
            os.write(self._wake_w, b"x")
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _run(self) -> None:
        ep = select.epoll()
        try:
            fds = (self._tun, self._sock_fd, self._wake_r)
            for fd in fds:
                ep.register(fd, select.EPOLLIN)
            clock, yield_cpu, poll, most = time.perf_counter, os.sched_yield, ep.poll, len(fds)
            readable = self._readable
            timeout, last = -1.0, 0.0
            while not self._stopping:
                # ask epoll what is readable instead of trying each fd: a read that fails
                # with EAGAIN costs ~5x an epoll_wait(0), most of it the exception
                ready = poll(timeout, most)  # (not 1023 events' room, allocated per call)
                if not ready:
                    if clock() - last > SPIN:
                        timeout = -1.0  # quiet for SPIN s: sleep until something comes
                    else:
                        yield_cpu()
                    continue
                timeout, last = 0.0, clock()
                for fd, _ in ready:
                    readable(fd)
        except Exception as e:  # a dead fd (device deleted) or epoll failed: the agent heals us
            self.error = e
            if not isinstance(e, OSError):
                log.error("udp datapath failed", exc_info=sys.exc_info())
        finally:
            ep.close()

    def _readable(self, fd: int) -> None:
        """One read from `fd`, which epoll reported readable (the TUN, the socket, or the wake-up
        pipe), and what it asks for. An OSError (the TUN deleted) ends the thread; any other
        exception is a bug met by what was read: that read is counted as dropped
        (`Drop.INTERNAL`) and the thread goes on with the next one (`_internal_error`)."""
        try:
            if fd == self._tun:
                try:
                    n = os.readv(fd, self._riov)
                except BlockingIOError:
                    return
                self._egress(n)
            elif fd == self._sock_fd:
                try:
                    n, anc, flags, src = self._sock.recvmsg_into(
                        self._receiver.iov, _ANC, _MSG_DONTWAIT
                    )
                except BlockingIOError:
                    return
                if flags & _MSG_TRUNC:
                    self.drops[Drop.TRUNCATED] += 1
                else:
                    self._ingress(n, anc, src)
        except OSError:
            raise
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        """Count the read being handled as dropped (`internal`) and start the next receive
        afresh; log the first error with its traceback, later ones at most once per
        INTERNAL_LOG_EVERY s, with how many there were (a peer could make one per packet).
        Called in the handler of the exception."""
        self.drops[Drop.INTERNAL] += 1
        self._receiver.reset()
        now = time.monotonic()
        if self._internal_logged_at is None:
            log.error(
                "udp datapath: dropped a packet it failed to handle (counted as internal); "
                "further such errors are logged at most every %.0f s",
                INTERNAL_LOG_EVERY,
                exc_info=True,
            )
        elif now - self._internal_logged_at >= INTERNAL_LOG_EVERY:
            log.error(
                "udp datapath: %d more packets dropped as internal errors, the last: %r",
                self._internal_unlogged + 1,
                sys.exc_info()[1],
            )
        else:
            self._internal_unlogged += 1
            return
        self._internal_logged_at, self._internal_unlogged = now, 0

    # -- with a virtio-net header: offloads both ways ----------------------------------------
    def _egress_vnet(self, n: int) -> None:
        n -= VNET_LEN
        if self._vbuf == PLAIN:  # nothing offloaded (a ping, say): routed, and sent whole
            out = self.routes.egress(self._rbuf, 0, n)
            if isinstance(out, Peer):
                self._send_whole(out, n)
                return
        else:
            out = transmit(self.routes, self._vbuf, self._rbuf, n, self._gathers)
            if isinstance(out, tuple):
                self._send(*out)
                return
        if isinstance(out, Reply):
            self.drops[out.reason] += 1
            self._write([PLAIN, out.packet])
        else:
            self.drops[out] += 1

    def _segment_cmsg(self, seg: int) -> list[tuple[int, int, bytes]]:
        """The UDP_SEGMENT ancillary data for `seg`-byte datagrams (kept for the last size)."""
        if seg != self._cmsg_seg:
            self._cmsg = [(SOL_UDP, UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))]
            self._cmsg_seg = seg
        return self._cmsg

    def _received(self, n: int, gro: int) -> None:
        self.packets_in += -(-n // gro) if gro else 1
        self.bytes_in += n

    def _send_whole(self, peer: Peer, n: int) -> None:
        """Send the packet read from the TUN, _rbuf[:n], as one datagram."""
        try:
            sent = self._sock.sendto(self._rview[:n], peer.addr)
        except OSError:
            self.drops[Drop.SEND_FAILED] += 1
            return
        self.packets_out += 1
        self.bytes_out += sent

    def _send(self, peer: Peer, sends: list[Send]) -> None:
        """Send each (buffers, size) as size-byte datagrams (the last may be shorter)."""
        addr, sock = peer.addr, self._sock
        for iov, seg in sends:
            try:
                if len(iov) == 1 and len(iov[0]) <= seg:
                    sent = sock.sendto(iov[0], addr)
                else:
                    sent = sock.sendmsg(iov, self._segment_cmsg(seg), 0, addr)
            except OSError:
                self.drops[Drop.SEND_FAILED] += 1
                continue
            self.packets_out += -(-sent // seg)
            self.bytes_out += sent

    def _ingress_vnet(
        self, n: int, anc: list[tuple[int, int, bytes]], src: tuple[str, int]
    ) -> None:
        """Hand the receive machine the n bytes that came into its `iov` from `src` and write
        what it answers; while it holds a run open, the burst's next send may be waiting
        already: receive once more without waiting, and hand it that too."""
        rx = self._receiver
        if not anc and rx.iov is rx.flat:  # one datagram into the flat buffer (READY)
            writes = rx.datagram(self.routes, n, src)
            gro = n
        else:
            gro = _gro_size(anc, n)
            writes = rx.receive(self.routes, n, gro, src)
        for write in writes:
            self._write(write)
        self.packets_in += -(-n // gro) if gro else 1
        self.bytes_in += n
        if rx.state is not OPEN:
            return
        try:
            n, anc, flags, src = self._sock.recvmsg_into(rx.iov, _ANC, _MSG_DONTWAIT)
        except BlockingIOError:
            writes = rx.nothing()
        else:
            if flags & _MSG_TRUNC:
                writes = rx.truncated()
            else:
                gro = _gro_size(anc, n)
                self.packets_in += -(-n // gro) if gro else 1
                self.bytes_in += n
                writes = rx.receive(self.routes, n, gro, src)
        for write in writes:
            self._write(write)

    def _write(self, buffers: list[Buf]) -> None:
        try:
            os.writev(self._tun, buffers)
        except OSError as e:
            if e.errno == errno.EBADFD:  # the device is gone
                raise
            self.drops[Drop.WRITE_FAILED] += 1

    # -- plain TUN: one packet per system call ------------------------------------------------
    def _egress_plain(self, n: int) -> None:
        out = self.routes.egress(self._rbuf, 0, n)
        if isinstance(out, Peer):
            self._send_whole(out, n)
        elif isinstance(out, Reply):
            self.drops[out.reason] += 1
            self._write([out.packet])
        else:
            self.drops[out] += 1

    def _ingress_plain(
        self, n: int, anc: list[tuple[int, int, bytes]], src: tuple[str, int]
    ) -> None:
        self._received(n, n)
        out = self.routes.ingress(src[0], src[1], self._ubuf, 0, n)
        if isinstance(out, Drop):
            self.drops[out] += 1
        else:
            self._write([memoryview(self._ubuf)[:n]])
