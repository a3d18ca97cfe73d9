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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.udp import datapath as datapath_module
from backends.udp import receiver as receiver_module
from backends.udp.core import Drop, Peer, Routes
from backends.udp.datapath import UDP_SEGMENT, Datapath, open_socket
from backends.udp.ipv4 import ACK, PSH, checksum
from backends.udp.trains import TAG_LEN
from backends.udp.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, PLAIN, VNET, VNET_LEN

from .test_udp_core import ip_packet, reference_checksum
from .test_udp_offload import (
    A_IP,
    A_NET,
    B_NET,
    B_T,
    MTU,
    NETWORK,
    as_arrived,
    corrupted,
    short_packet,
    tcp_packet,
    tcp_valid,
    train,
    train_of,
    with_equal_headers,
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
        vnet = VNET.unpack_from(data, at)
        size = struct.unpack_from("!H", data, at + VNET_LEN + 2)[0]
        out.append((vnet, data[at + VNET_LEN : at + VNET_LEN + size]))
        at += VNET_LEN + size
    return out


def receive(dp: Datapath, dgrams: list[bytes], src: str = A_IP) -> None:
    """One receive of `dgrams` (a GRO batch), put where the datapath's next receive goes."""
    data = b"".join(dgrams)
    if dp._receiver.iov is dp._receiver.flat:
        dp._receiver.buf[: len(data)] = data
    else:
        dp._receiver._pair[0].load(data)
    gro = [(17, 104, struct.pack("=i", len(dgrams[0])))]  # UDP_GRO's segment size
    dp._ingress_vnet(len(data), gro if len(dgrams) > 1 else [], (src, 8285))


def test_a_packet_and_a_train_in_one_batch_are_both_written(dp) -> None:
    """GRO batches equal-sized datagrams of one flow: a full-size packet then a train."""
    packet = bytes(tcp_packet(os.urandom(MTU - 52), flags=ACK))
    assert len(packet) == MTU
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 20), seq=50000, flags=ACK))
    receive(dp, [packet, *dgrams[:-1]])  # the train's short last chunk comes alone
    receive(dp, dgrams[-1:])
    got = dp.written()
    assert not dp.drops, dp.drops
    assert [len(p) for _, p in got] == [len(packet), len(sent)]
    assert got[1][1][20:36] == sent[20:36] and got[1][1][38:] == sent[38:]
    assert dp.trains_in == 1


def test_trains_from_a_stranger_or_of_tiny_datagrams_lay_out_nothing(dp) -> None:
    layouts = dict(dp._receiver._scatters)
    for size in range(3, 12):  # each would need a receive layout of its own
        receive(dp, [b"\xf0\x00" + bytes(size - 2)] * 3, src="203.0.113.9")
    assert dp._receiver._scatters == layouts
    assert dp.drops == {Drop.UNKNOWN_SENDER: 27}
    for size in range(3, 12):  # from the peer itself: too small to be chunks of a train
        receive(dp, [b"\xf0\x00" + bytes(size - 2)] * 3)
    assert dp._receiver._scatters == layouts and dp.drops[Drop.BAD_TRAIN] == 27
    assert dp.written() == []


def test_a_train_then_a_batch_of_packets_switch_layouts_and_lose_nothing(dp) -> None:
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 46), flags=ACK))
    receive(dp, dgrams)
    assert (dp._receiver._pair[0].hl, dp._receiver._pair[0].seg) == (TAG_LEN, MTU)
    packets = [bytes(tcp_packet(os.urandom(MTU - 52), seq=s, flags=ACK)) for s in (1, 2)]
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


def segments(
    count: int, seq: int, src: str = A_SRC, mss: int = 1000, equal: bool = False, **kw
) -> list[bytes]:
    """Consecutive TCP segments from `src`; a reference node's (C's) with full checksums, with
    `equal` all in one checksum field (`with_equal_headers`)."""
    out = train(count, mss=mss, seq=seq, src=src, **kw)
    if src != C_SRC:
        return out
    return with_equal_headers(out) if equal else [with_full_csum(d) for d in out]


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


def test_a_corrupted_segment_from_a_reference_node_is_written_as_it_came(wire) -> None:
    """Issue 12, 4, through the datapath: C (no csum) sends a burst with one segment whose
    payload changed in transit; every packet is written as it came, nothing offloaded (no
    NEEDS_CSUM, no join), so the kernel verifies each and drops the corrupted one."""
    dgrams = segments(6, 1000, src=C_SRC)
    dgrams[3] = corrupted(dgrams[3])
    with datapath(wire) as dp:
        wire.send(wire.c, dgrams)
        drain(dp)
        got = dp.written()
        assert [vnet for vnet, _ in got] == [VNET.unpack(PLAIN)] * 6
        assert [as_arrived([PLAIN, p]) for _, p in got] == dgrams
        assert not tcp_valid(dgrams[3]) and not dp.drops


def test_an_unexpected_error_costs_one_receive_and_the_thread_goes_on(
    wire, monkeypatch, caplog
) -> None:
    """A bug met by one datagram (here: the receive dispatch raising on it) is counted as a
    drop (`internal`) and logged once with its traceback, not once per datagram; the thread
    goes on with the next datagram."""
    real = receiver_module.receive

    def buggy(routes, ip, port, buf, n, *args):
        if b"poison" in bytes(buf[:n]):
            raise RuntimeError("a bug")
        return real(routes, ip, port, buf, n, *args)

    monkeypatch.setattr(receiver_module, "receive", buggy)
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


def admitted(d: bytes, src_net: IPv4Network) -> bool:
    """Node B's ingress validation of a datagram from the peer holding `src_net`, written
    the obvious way."""
    if len(d) < 20 or d[0] >> 4 != 4:
        return False
    ihl = (d[0] & 0x0F) * 4
    return (
        20 <= ihl <= len(d)
        and struct.unpack("!H", d[2:4])[0] == len(d)
        and reference_checksum(d[:ihl]) == 0
        and d[8] > 1
        and IPv4Address(d[12:16]) in src_net
        and IPv4Address(d[16:20]) in B_NET
    )


def _seq(p: bytes) -> int:
    return struct.unpack_from("!I", p, (p[0] & 0x0F) * 4 + 4)[0]


def _same_stream(a: bytes, b: bytes, hl: int) -> bool:
    """The headers of two segments agree but for what a join changes or leaves to the
    kernel: IP length, ID, TTL, checksums, sequence number, PSH."""
    ihl = (a[0] & 0x0F) * 4
    skip = {2, 3, 4, 5, 8, 10, 11, ihl + 4, ihl + 5, ihl + 6, ihl + 7, ihl + 13, ihl + 16, ihl + 17}
    return (
        len(a) > hl <= len(b)
        and a[9] == 6
        and all(a[i] == b[i] for i in range(hl) if i not in skip)
    )


def assert_only_valid_writes(
    got: list[tuple[tuple[int, ...], bytes]],
    sent: dict[str, list[bytes]],
    trains: list[bytes],
) -> None:
    """Each TUN write is a datagram a peer sent and node B admits (TTL one less), a whole
    train A sent, or a join of admitted TCP segments of one stream of A's, in order; a peer
    without csum (C) has its packets written as they came, nothing offloaded."""
    for vnet, p in got:
        flags, gso_type, hl, gso_size = vnet[:4]
        assert checksum(p[:20]) == 0 and struct.unpack("!H", p[2:4])[0] == len(p)
        src = IPv4Address(p[12:16])
        assert IPv4Address(p[16:20]) in B_NET and (src in A_NET or src in C_NET)
        capable = src in A_NET
        admitted_here = sent[A_SRC if capable else C_SRC]
        if gso_type == GSO_NONE:
            assert capable or flags == 0, "a reference node's packet written with NEEDS_CSUM"
            back = bytearray(p)  # as it arrived: TTL + 1, the header checksum redone
            back[8] += 1
            back[10:12] = b"\0\0"
            back[10:12] = checksum(back[:20]).to_bytes(2, "big")
            if flags & F_NEEDS_CSUM:  # the L4 checksum was reset to the pseudo-header sum
                field = vnet[4] + vnet[5]
                assert any(
                    d[:field] == back[:field] and d[field + 2 :] == back[field + 2 :]
                    for d in admitted_here
                )
            else:
                assert bytes(back) in admitted_here
            continue
        assert capable, "a reference node's segments joined (the kernel computes the checksum)"
        assert gso_type == GSO_TCPV4 and flags == F_NEEDS_CSUM and p[9] == 6
        if any(t[:8] + t[9:10] + t[12:] == p[:8] + p[9:10] + p[12:] for t in trains):
            continue  # a whole train (TTL and the checksums aside)
        seq0, payload = _seq(p), p[hl:]
        for j, at in enumerate(range(0, len(payload), gso_size)):
            chunk = payload[at : at + gso_size]
            assert any(
                _same_stream(d, p, hl)
                and _seq(d) == (seq0 + j * gso_size) & 0xFFFFFFFF
                and d[hl:] == chunk
                for d in admitted_here
            ), f"segment {j} of a joined write was never sent whole and valid"


ITEMS = ["good", "short", "truncated", "ihl", "corrupt", "garbage"]


def fuzz_item(data: st.DataObject, kind: str, src: str, seq: int) -> tuple[bytes, int]:
    """A datagram of `kind` from a peer's subnet `src` at sequence number `seq`, and the
    sequence number after it."""
    mss = 1000
    if kind in ("good", "corrupt", "truncated", "ihl"):
        size = data.draw(st.sampled_from([mss, mss, data.draw(st.integers(1, mss))]))
        flags = data.draw(st.sampled_from([ACK, ACK, ACK | PSH]))
        [d] = segments(1, seq, src=src, mss=size)
        d = bytearray(d)
        d[33] = flags
        if src == C_SRC:
            d = bytearray(with_full_csum(bytes(d)))
        seq += size
        if kind == "corrupt":
            d[data.draw(st.integers(52, len(d) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncated":  # cut anywhere, the IP length made to fit
            d = d[: data.draw(st.integers(20, len(d) - 1))]
            d[2:4] = struct.pack("!H", len(d))
        elif kind == "ihl":
            d[0] = 0x40 | data.draw(st.integers(0, 15))
        if kind in ("truncated", "ihl"):
            d[10:12] = b"\0\0"
            d[10:12] = checksum(d[:20]).to_bytes(2, "big")
        return bytes(d), seq
    if kind == "short":
        return short_packet(
            data.draw(st.integers(20, 33)), data.draw(st.sampled_from([1, 6, 17])), src
        ), seq
    return data.draw(st.binary(max_size=MTU)), seq


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzz_the_receive_dispatch_with_runs_open(wire, data: st.DataObject) -> None:
    """A TCP run is opened from a peer (A, or the reference node C), then datagrams of every
    kind arrive from it and from the others, alone or in GRO batches: nothing raises, no
    internal error is counted, every datagram is received, only valid packets are written
    (`assert_only_valid_writes`), and afterwards a plain packet from each peer still goes
    through."""
    who = {A_SRC: wire.a, C_SRC: wire.c}
    seqs = {A_SRC: 5000, C_SRC: 70000}
    sent: dict[str, list[bytes]] = {A_SRC: [], C_SRC: []}
    trains: list[bytes] = []
    with datapath(wire) as dp:

        def send(sock: socket.socket, dgrams: list[bytes], src: str | None) -> None:
            wire.send(sock, dgrams)
            if src is not None:
                sent[src] += dgrams

        first = data.draw(st.sampled_from([A_SRC, C_SRC]))
        opening = segments(data.draw(st.integers(1, 8)), seqs[first], src=first)
        seqs[first] += 1000 * len(opening)
        send(who[first], opening, first)  # full-sized, no PSH: the run stays open
        for _ in range(data.draw(st.integers(1, 8))):
            sender = data.draw(st.sampled_from([first, first, first, "other", "stranger"]))
            src = (C_SRC if first == A_SRC else A_SRC) if sender == "other" else first
            if sender == "stranger":
                sock, src = data.draw(st.sampled_from([wire.stranger, wire.unknown])), None
            else:
                sock = who[src]
            shape = data.draw(st.sampled_from(["one", "batch", "train"]))
            if shape == "train":  # only A may send trains: from anyone else they are dropped
                sp = tcp_packet(
                    os.urandom(data.draw(st.integers(100, 1420 * 20))), seq=seqs[A_SRC], flags=ACK
                )
                dgrams, whole = train_of(sp)
                if src == A_SRC:
                    seqs[A_SRC] += len(sp) - 52
                    trains.append(whole)
                if data.draw(st.booleans()):  # a chunk lost or cut
                    k = data.draw(st.integers(0, len(dgrams) - 1))
                    cut = dgrams[k][: data.draw(st.integers(0, len(dgrams[k])))]
                    if len(cut) < len(dgrams[k]):  # it ends the send (and the GRO batch)
                        dgrams = dgrams[:k] + ([cut] if cut or k == 0 else [])
                send(sock, dgrams, src)
                continue
            item_src = src or A_SRC
            if shape == "batch":  # full-sized segments, then any datagram no longer
                k = data.draw(st.integers(1, 6))
                dgrams = segments(k, seqs[item_src], src=item_src, equal=data.draw(st.booleans()))
                seqs[item_src] += 1000 * k
                if data.draw(st.booleans()):
                    i = data.draw(st.integers(0, k - 1))
                    dgrams[i] = corrupted(dgrams[i], data.draw(st.integers(52, 1051)))
                tail, seqs[item_src] = fuzz_item(
                    data, data.draw(st.sampled_from(ITEMS)), item_src, seqs[item_src]
                )
                if 0 < len(tail) <= len(dgrams[0]):
                    dgrams.append(tail)
            else:
                tail, seqs[item_src] = fuzz_item(
                    data, data.draw(st.sampled_from(ITEMS)), item_src, seqs[item_src]
                )
                dgrams = [tail]
            send(sock, dgrams, src)
        drain(dp)  # raises nothing
        assert dp.drops[Drop.INTERNAL] == 0, dp.drops
        assert dp.packets_in == wire.sent
        for src in sent:
            sent[src] = [d for d in sent[src] if admitted(d, A_NET if src == A_SRC else C_NET)]
        assert_only_valid_writes(dp.written(), sent, trains)
        pings = [bytes(ip_packet(s, "10.244.2.2", proto=1, payload=os.urandom(64))) for s in who]
        for src, ping in zip(who, pings, strict=True):
            wire.send(who[src], [ping])
        drain(dp)
        got = dp.written()
        assert [p[12:] for _, p in got] == [q[12:] for q in pings]


# -- egress: what one TUN read becomes on the wire ----------------------------------------------


def test_a_packet_read_with_nothing_offloaded_is_routed_and_sent_whole() -> None:
    """A TUN read whose virtio-net header asks for nothing (a ping) goes out as one datagram,
    TTL decremented; one for a subnet no peer holds is answered with an ICMP unreachable, one
    with a partial checksum goes the offload way (left partial for a capable peer). A
    SOCK_SEQPACKET pair stands in for the TUN: one read or write per packet."""
    tun, far = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(2)
    port = peer.getsockname()[1]
    routes = Routes(NETWORK, 24, A_NET, [Peer(B_NET, IPv4Address("127.0.0.1"), port, True)], port)
    sock = open_socket("127.0.0.1", 0, gro=True)
    dp = Datapath(tun.fileno(), sock, True, routes, MTU)
    try:
        ping = ip_packet("10.244.1.2", "10.244.2.2", proto=1, payload=b"\x08\0\xf7\xff" + bytes(4))
        far.send(PLAIN + ping)
        dp._readable(tun.fileno())
        got = peer.recv(2048)
        assert got[8] == ping[8] - 1 and got[:8] == ping[:8] and got[12:] == ping[12:]
        assert checksum(got[:20]) == 0  # the header checksum patched for the new TTL
        assert (dp.packets_out, dp.bytes_out) == (1, len(ping))

        lost = ip_packet("10.244.1.2", "10.244.9.2", proto=1, payload=b"\x08\0\xf7\xff" + bytes(4))
        far.send(PLAIN + lost)
        dp._readable(tun.fileno())
        reply = far.recv(2048)
        assert reply[:VNET_LEN] == PLAIN and reply[VNET_LEN + 20] == 3  # net unreachable
        assert dp.drops == Counter({Drop.NO_PEER: 1}) and dp.packets_out == 1

        udp = ip_packet("10.244.1.2", "10.244.2.2")  # its UDP checksum left partial
        far.send(VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6) + udp)
        dp._readable(tun.fileno())
        got = peer.recv(2048)
        assert got[20:] == udp[20:] and dp.packets_out == 2  # left partial for the peer
    finally:
        for s in (tun, far, peer, sock):
            s.close()
        os.close(dp._wake_r)
        os.close(dp._wake_w)
