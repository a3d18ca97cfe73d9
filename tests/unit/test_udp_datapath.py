"""The datapath's receive dispatch between packets and trains, on a real UDP socket, with a
pipe standing in for the TUN (what is written to it is read back and parsed)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import time
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest

from backends.udp import datapath as datapath_module
from backends.udp import offload as O
from backends.udp.core import Drop, Peer, Routes
from backends.udp.datapath import UDP_SEGMENT, Datapath, open_socket

from .test_udp_core import ip_packet
from .test_udp_offload import (
    A_IP,
    A_NET,
    B_NET,
    B_T,
    MTU,
    NETWORK,
    short_packet,
    tcp_packet,
    train,
    train_of,
    with_full_csum,
)

F_SETPIPE_SZ = 1031


@pytest.fixture
def dp():
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    os.set_blocking(r, False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # nothing arrives: the continuation receive finds nothing
    path = Datapath(w, sock, True, B_T, MTU)
    path.written = lambda: _writes(r)  # type: ignore[attr-defined]
    yield path
    sock.close()
    os.close(r)
    os.close(w)
    os.close(path._wake_r)
    os.close(path._wake_w)


def _writes(fd: int) -> list[tuple[tuple[int, ...], bytes]]:
    """The (virtio-net header, packet) pairs written so far."""
    data = b""
    while True:
        try:
            data += os.read(fd, 1 << 20)
        except BlockingIOError:
            break
    out, at = [], 0
    while at < len(data):
        vnet = O.VNET.unpack_from(data, at)
        size = struct.unpack_from("!H", data, at + O.VNET_LEN + 2)[0]
        out.append((vnet, data[at + O.VNET_LEN : at + O.VNET_LEN + size]))
        at += O.VNET_LEN + size
    return out


def receive(dp: Datapath, dgrams: list[bytes], src: str = A_IP) -> None:
    """One receive of `dgrams` (a GRO batch), put where the datapath's next receive goes."""
    data = b"".join(dgrams)
    if dp._rx is dp._flat:
        dp._ubuf[: len(data)] = data
    else:
        dp._pair[0].load(data)
    gro = [(17, 104, struct.pack("=i", len(dgrams[0])))]  # UDP_GRO's segment size
    dp._ingress_vnet(len(data), gro if len(dgrams) > 1 else [], (src, 8285))


def test_a_packet_and_a_train_in_one_batch_are_both_written(dp) -> None:
    """GRO batches equal-sized datagrams of one flow: a full-size packet then a train."""
    packet = bytes(tcp_packet(os.urandom(MTU - 52), flags=O.ACK))
    assert len(packet) == MTU
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 20), seq=50000, flags=O.ACK))
    receive(dp, [packet, *dgrams[:-1]])  # the train's short last chunk comes alone
    receive(dp, dgrams[-1:])
    got = dp.written()
    assert not dp.drops, dp.drops
    assert [len(p) for _, p in got] == [len(packet), len(sent)]
    assert got[1][1][20:36] == sent[20:36] and got[1][1][38:] == sent[38:]
    assert dp.trains_in == 1


def test_trains_from_a_stranger_or_of_tiny_datagrams_lay_out_nothing(dp) -> None:
    layouts = dict(dp._scatters)
    for size in range(3, 12):  # each would need a receive layout of its own
        receive(dp, [b"\xf0\x00" + bytes(size - 2)] * 3, src="203.0.113.9")
    assert dp._scatters == layouts
    assert dp.drops == {Drop.UNKNOWN_SENDER: 27}
    for size in range(3, 12):  # from the peer itself: too small to be chunks of a train
        receive(dp, [b"\xf0\x00" + bytes(size - 2)] * 3)
    assert dp._scatters == layouts and dp.drops[Drop.BAD_TRAIN] == 27
    assert dp.written() == []


def test_a_train_then_a_batch_of_packets_switch_layouts_and_lose_nothing(dp) -> None:
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 46), flags=O.ACK))
    receive(dp, dgrams)
    assert (dp._pair[0].hl, dp._pair[0].seg) == (O.TAG_LEN, MTU)
    packets = [bytes(tcp_packet(os.urandom(MTU - 52), seq=s, flags=O.ACK)) for s in (1, 2)]
    receive(dp, packets)
    got = dp.written()
    assert not dp.drops and [len(p) for _, p in got] == [len(sent), MTU, MTU]


# -- the whole receive dispatch on real datagrams: what a peer's containers can send -----------
#
# Real sockets on the loopback stand in for the peers: A (csum and train, 127.0.0.1) and C (a
# reference node: neither, 127.0.0.2), both on the backend Port P; a stranger on A's address
# but another port, and an unknown host (127.0.0.3). A sendmsg with UDP_SEGMENT reaches the
# datapath's UDP_GRO socket as one receive of equal-sized datagrams (the last may be
# shorter), as a GRO batch off a real network does. `Datapath._readable` is what the thread
# runs for each readable fd; the tests call it until the socket is empty.

C_NET = IPv4Network("10.244.3.0/24")
A_SRC, C_SRC = "10.244.1.2", "10.244.3.2"


class Wire:
    """The datapath's socket (UDP_GRO on, as the agent opens it) and the senders."""

    def __init__(self) -> None:
        self.rx = open_socket("127.0.0.1", 0, gro=True)
        for _ in range(20):  # one port P free on 127.0.0.1, .2 and .3
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
            socks[0].bind(("127.0.0.1", 0))
            self.port = socks[0].getsockname()[1]
            try:
                socks[1].bind(("127.0.0.2", self.port))
                socks[2].bind(("127.0.0.3", self.port))
                break
            except OSError:
                for s in socks:
                    s.close()
        else:
            raise RuntimeError("no UDP port free on 127.0.0.1, .2 and .3 at once")
        self.a, self.c, self.unknown = socks
        self.stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a peer's address,
        self.stranger.bind(("127.0.0.1", 0))  # but not the backend Port
        peers = [
            Peer(A_NET, IPv4Address("127.0.0.1"), self.port, True, True),
            Peer(C_NET, IPv4Address("127.0.0.2"), self.port, False, False),
        ]
        self.routes = Routes(NETWORK, 24, B_NET, peers, self.port)
        self.sent = 0  # datagrams

    def send(self, sock: socket.socket, dgrams: list[bytes]) -> None:
        """One send: a single datagram, or equal-sized ones (the last may be shorter) in one
        UDP_SEGMENT call, which the receiver gets as one GRO receive."""
        dest = self.rx.getsockname()
        if len(dgrams) == 1:
            sock.sendto(dgrams[0], dest)
        else:
            size = struct.pack("=H", len(dgrams[0]))
            sock.sendmsg([b"".join(dgrams)], [(17, UDP_SEGMENT, size)], 0, dest)
        self.sent += len(dgrams)

    def discard(self) -> None:
        while select.select([self.rx], [], [], 0)[0]:
            self.rx.recv(1 << 17)

    def close(self) -> None:
        for s in (self.rx, self.a, self.c, self.unknown, self.stranger):
            s.close()


@pytest.fixture(scope="module")
def wire():
    w = Wire()
    yield w
    w.close()


@contextlib.contextmanager
def datapath(wire: Wire):
    """A fresh datapath on the wire's socket, a pipe for its TUN (`written()` reads it)."""
    wire.discard()
    wire.sent = 0
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    os.set_blocking(r, False)
    path = Datapath(w, wire.rx, True, wire.routes, MTU)
    path.written = lambda: _writes(r)  # type: ignore[attr-defined]
    try:
        yield path
    finally:
        path.stop()  # also closes its wake-up pipe (unless the thread is stuck)
        os.close(r)
        os.close(w)


def drain(dp: Datapath) -> None:
    """What the datapath thread does while the socket is readable."""
    while select.select([dp._sock], [], [], 0)[0]:
        dp._readable(dp._sock_fd)


def segments(count: int, seq: int, src: str = A_SRC, mss: int = 1000, **kw) -> list[bytes]:
    """Consecutive TCP segments from `src`; a reference node's (C's) with full checksums."""
    out = train(count, mss=mss, seq=seq, src=src, **kw)
    return [with_full_csum(d) for d in out] if src == C_SRC else out


def test_a_tiny_ping_while_a_run_is_open_is_written_and_the_run_too(wire) -> None:
    """Issue 12, 3: the datagram after a receive that left a TCP run open is `ping -s 0`'s
    28 bytes (taken by the continuation receive), or it ends the same GRO batch."""
    ping = short_packet(28)
    with datapath(wire) as dp:
        for sends in ([segments(4, 5000), [ping]], [[*segments(4, 9000), ping]]):
            for dgrams in sends:
                wire.send(wire.a, dgrams)
            drain(dp)
            got = dp.written()
            assert not dp.drops, dp.drops
            assert [len(p) for _, p in got] == [52 + 4000, 28]
            assert got[1][1][12:] == ping[12:] and got[1][1][8] == ping[8] - 1  # TTL - 1
        assert dp.packets_in == wire.sent


def test_an_unexpected_error_costs_one_receive_and_the_thread_goes_on(
    wire, monkeypatch, caplog
) -> None:
    """A bug met by one datagram (here: the receive dispatch raising on it) is counted as a
    drop (`internal`) and logged once with its traceback, not once per datagram; the thread
    goes on with the next datagram."""
    real = datapath_module.receive

    def buggy(routes, ip, port, buf, n, *args):
        if b"poison" in bytes(buf[:n]):
            raise RuntimeError("a bug")
        return real(routes, ip, port, buf, n, *args)

    monkeypatch.setattr(datapath_module, "receive", buggy)
    poison = bytes(ip_packet(A_SRC, "10.244.2.2", payload=b"poison"))
    ping = bytes(ip_packet(A_SRC, "10.244.2.2", proto=1, payload=os.urandom(56)))
    with datapath(wire) as dp:
        dp.start()
        for _ in range(50):
            wire.send(wire.a, [poison])
        wire.send(wire.a, [ping])
        deadline = time.monotonic() + 5
        while dp.packets_in < wire.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dp.alive and dp.error is None
        assert dp.drops == Counter({Drop.INTERNAL: 50})
        assert [p[12:] for _, p in dp.written()] == [ping[12:]]
    logged = [r for r in caplog.records if r.name == datapath_module.__name__]
    assert len(logged) == 1 and logged[0].exc_info is not None
