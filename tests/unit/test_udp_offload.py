"""The udp backend's offload helpers: TSO super-packets into UDP_SEGMENT sends, GRO trains back
into super-packets, partial checksums, and nothing written that failed validation."""

from __future__ import annotations

import os
import struct
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.udp.core import Drop, Peer, Reply, Routes
from backends.udp.egress import transmit
from backends.udp.ipv4 import ACK, CWR, FIN, PSH, Buf, checksum, progression, set_length
from backends.udp.layouts import MAX_SEGMENTS, MAX_UDP_PAYLOAD, Gathers, Scatter, Send
from backends.udp.runs import Run, receive, receive_scattered
from backends.udp.trains import MAX_TRAIN_PAYLOAD, TAG_LEN, Trains, train_tags
from backends.udp.tso import segment
from backends.udp.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, PLAIN, VNET

from .test_udp_core import ip_packet, reference_checksum, valid

NETWORK = IPv4Network("10.244.0.0/16")
A_NET, B_NET = IPv4Network("10.244.1.0/24"), IPv4Network("10.244.2.0/24")
A_IP, B_IP = "192.0.2.11", "192.0.2.12"


def routes_of(local: IPv4Network, peer_net: IPv4Network, peer_ip: str, partial: bool) -> Routes:
    return Routes(NETWORK, 24, local, [Peer(peer_net, IPv4Address(peer_ip), 8285, partial)])


A = routes_of(A_NET, B_NET, B_IP, True)  # node A sends to B ...
B = routes_of(B_NET, A_NET, A_IP, True)  # ... which receives from A
B_REF = routes_of(B_NET, A_NET, A_IP, False)  # B where A is a reference node

OPTIONS = bytes([1, 1, 8, 10]) + struct.pack("!II", 7, 9)  # NOP NOP timestamps


def tcp_packet(
    payload: bytes,
    seq: int = 1000,
    flags: int = ACK | PSH,
    src: str = "10.244.1.2",
    dst: str = "10.244.2.2",
    ident: int = 7,
    df: bool = True,
    window: int = 500,
    ack: int = 2000,
) -> bytearray:
    """A TCP/IPv4 packet with a valid IP checksum and a partial TCP checksum (as TSO gives)."""
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, 8 << 4, flags, window, 0, 0) + OPTIONS
    )
    total = 20 + len(tcp) + len(payload)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total & 0xFFFF,
            ident,
            0x4000 if df else 0,
            64,
            6,
            0,
            IPv4Address(src).packed,
            IPv4Address(dst).packed,
        )
    )
    ip[10:12] = checksum(ip).to_bytes(2, "big")
    pkt = ip + tcp + payload
    pseudo = (sum(struct.unpack("!4H", pkt[12:20])) + 6 + len(tcp) + len(payload)) % 0xFFFF
    pkt[36:38] = (pseudo or 0xFFFF).to_bytes(2, "big")
    return pkt


def tcp_valid(pkt: bytes) -> bool:
    """The TCP checksum of a complete packet verifies."""
    ihl = (pkt[0] & 0x0F) * 4
    seg = bytes(pkt[ihl:])
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(seg))
    return reference_checksum(bytes(pseudo) + seg) in (0, 0xFFFF)


class Read:
    """One TUN read: the virtio-net header, the buffer the packet went to, its length."""

    def __init__(
        self, pkt: bytes, gso_type: int = GSO_TCPV4, gso_size: int = 1420, flags: int = 1
    ) -> None:
        self.vnet = VNET.pack(flags, gso_type, 52, gso_size, 20, 16)
        self.buf, self.n = bytearray(1 << 17), len(pkt)
        self.buf[: self.n] = pkt

    def transmit(self, routes: Routes) -> tuple[Peer, list[Send]] | Reply | Drop:
        return transmit(routes, self.vnet, self.buf, self.n)


def datagrams(sends: list[Send]) -> list[bytes]:
    """What the peer receives from these UDP_SEGMENT sends, one bytes per datagram."""
    out = []
    for iov, seg in sends:
        data = b"".join(bytes(b) for b in iov)
        out += [data[i : i + seg] for i in range(0, len(data), seg)]
    return out


def gro(dgrams: list[bytes]) -> tuple[bytearray, int, int]:
    """A UDP_GRO receive of equal-sized datagrams (the last may be shorter)."""
    buf = bytearray(1 << 17)
    data = b"".join(dgrams)
    buf[: len(data)] = data
    return buf, len(data), len(dgrams[0])


def packets_of(write: list) -> list[bytes]:
    """The IP packets a TUN write carries (a super-packet cut back into its segments)."""
    vnet = VNET.unpack(bytes(write[0]))
    if vnet[1] == GSO_NONE:
        return [b"".join(bytes(b) for b in write[1:])]
    hdr, parts = bytes(write[1]), [bytes(p) for p in write[2:]]
    assert vnet == (F_NEEDS_CSUM, GSO_TCPV4, len(hdr), len(parts[0]), 20, 16)
    return [hdr + b"".join(parts)]


# -- egress: segmentation ---------------------------------------------------------------------


@given(st.integers(0, 0xFFFFFFFF), st.integers(1, 0xFFFF), st.integers(1, 300))
def test_progression_is_the_sequence_mod_2_32_in_network_order(
    first: int, step: int, count: int
) -> None:
    """The big-integer fast path and the wrapping path agree with the plain definition."""
    expected = b"".join(((first + i * step) & 0xFFFFFFFF).to_bytes(4, "big") for i in range(count))
    got = progression(first, step, count)
    assert got.tobytes() == expected and len(got) == count and got.itemsize == 4


@given(st.binary(min_size=20, max_size=20), st.integers(20, 0xFFFF))
def test_set_length_keeps_the_header_checksum_valid(raw: bytes, length: int) -> None:
    h = bytearray(raw)
    h[0] = 0x45
    h[10:12] = b"\0\0"
    h[10:12] = checksum(h[:20]).to_bytes(2, "big")
    set_length(h, 0, length)
    assert struct.unpack("!H", h[2:4])[0] == length
    assert checksum(h[:20]) == 0  # the words of a valid header sum to negative zero


@pytest.mark.parametrize("partial", [True, False])
@pytest.mark.parametrize(
    ("paylen", "mss"), [(14200, 1420), (14201, 1420), (65483, 1420), (3000, 536)]
)
def test_segment_cuts_like_tso(paylen: int, mss: int, partial: bool) -> None:
    payload = os.urandom(paylen)
    sp = tcp_packet(payload, seq=0xFFFFFF00, flags=ACK | PSH | CWR | FIN)
    sends = segment(Read(sp).buf, 0, len(sp), mss, partial)
    assert sends is not None
    for iov, seg in sends:
        assert seg == 52 + mss
        assert len(iov) // 2 <= MAX_SEGMENTS
        assert sum(len(b) for b in iov) <= MAX_UDP_PAYLOAD
    segs = datagrams(sends)
    assert len(segs) == -(-paylen // mss)
    assert b"".join(s[52:] for s in segs) == payload
    for i, s in enumerate(segs):
        assert valid(s) and struct.unpack("!H", s[2:4])[0] == len(s)
        assert struct.unpack("!H", s[4:6])[0] == 7  # DF: one IP ID
        assert struct.unpack("!I", s[24:28])[0] == (0xFFFFFF00 + i * mss) & 0xFFFFFFFF
        flags = s[33]
        assert bool(flags & CWR) == (i == 0)
        assert bool(flags & (FIN | PSH)) == (i == len(segs) - 1)
        assert s[:2] == sp[:2] and s[6:10] == sp[6:10] and s[12:20] == sp[12:20]
        assert s[40:52] == sp[40:52]
        if partial:
            pseudo = (sum(struct.unpack("!4H", s[12:20])) + 6 + len(s) - 20) % 0xFFFF
            assert struct.unpack("!H", s[36:38])[0] % 0xFFFF == pseudo
        else:
            assert tcp_valid(s)


def test_segment_numbers_ids_without_df() -> None:
    r = Read(tcp_packet(bytes(5000), df=False, ident=0xFFFF), gso_size=1000)
    segs = datagrams(segment(r.buf, 0, r.n, 1000, True))
    assert [struct.unpack("!H", s[4:6])[0] for s in segs] == [0xFFFF, 0, 1, 2, 3]
    assert all(valid(s) for s in segs)


@pytest.mark.parametrize("partial", [True, False])
@pytest.mark.parametrize("paylen", [1421, 14200, 14201, 65483])
def test_cached_gathers_send_the_same_datagrams_packet_after_packet(
    paylen: int, partial: bool
) -> None:
    """The buffers kept per (hl, mss) for the datapath's read buffer give what fresh ones
    give, also for a second, shorter packet and one cut for another MSS after it."""
    routes = routes_of(A_NET, B_NET, B_IP, partial)
    buf = bytearray(1 << 17)
    gathers = Gathers(buf)
    for pkt, mss in [
        (tcp_packet(os.urandom(paylen), seq=0xFFFFF000), 1420),
        (tcp_packet(os.urandom(paylen // 3 + 1), seq=77), 1420),
        (tcp_packet(os.urandom(paylen), seq=5), 1000),
    ]:
        expected = Read(pkt, gso_size=mss).transmit(routes)
        vnet = Read(pkt, gso_size=mss).vnet
        buf[: len(pkt)] = pkt
        peer, sends = transmit(routes, vnet, buf, len(pkt), gathers)
        assert isinstance(expected, tuple) and peer == expected[0]
        assert datagrams(sends) == datagrams(expected[1])
        assert [seg for _, seg in sends] == [seg for _, seg in expected[1]]
    assert gathers.get(52, 1420) is gathers.get(52, 1420)  # kept, not made per packet


def test_gathers_stay_few_and_small() -> None:
    buf = bytearray(1 << 17)
    gathers = Gathers(buf)
    for mss in range(500, 500 + 3 * Gathers.LIMIT):
        gathers.get(52, mss)
    assert len(gathers._by) <= Gathers.LIMIT
    gathers = Gathers(buf)
    pkt = tcp_packet(os.urandom(3000))
    buf[: len(pkt)] = pkt
    sends = segment(buf, 0, len(pkt), 88, True, gathers)  # TCP's smallest MSS
    assert sends is not None and len(datagrams(sends)) == 35
    assert not gathers._by  # made for this packet, not kept with a list per 88 bytes


@pytest.mark.parametrize(
    "pkt",
    [
        ip_packet("10.244.1.2", "10.244.2.2"),  # not TCP
        tcp_packet(b"")[:52],  # no payload
        tcp_packet(b"x")[:30],  # cut TCP header
    ],
)
def test_segment_refuses_malformed_super_packets(pkt: bytes) -> None:
    r = Read(pkt)
    assert segment(r.buf, 0, r.n, 1420, True) is None
    assert r.transmit(A) is Drop.BAD_OFFLOAD


def test_transmit_super_packet_to_a_peer() -> None:
    peer, sends = Read(tcp_packet(bytes(30000))).transmit(A)
    assert peer.addr == (B_IP, 8285)
    segs = datagrams(sends)
    assert len(segs) == 22 and all(s[8] == 63 for s in segs)  # TTL decremented once


@pytest.mark.parametrize("partial", [True, False])
def test_transmit_single_packet_checksum(partial: bool) -> None:
    routes = routes_of(A_NET, B_NET, B_IP, partial)
    pkt = tcp_packet(b"hello")
    peer, [(iov, _)] = Read(pkt, gso_type=GSO_NONE, gso_size=0).transmit(routes)
    out = bytes(iov[0])
    assert out[20:] != pkt[20:] if not partial else out[20:] == pkt[20:]
    if not partial:
        assert tcp_valid(out)


def test_transmit_finishes_a_udp_checksum_for_a_reference_peer() -> None:
    pkt = ip_packet("10.244.1.2", "10.244.2.2", payload=b"\x12\x34\x00\x35\x00\x0c\x00\x00data")
    pseudo = (sum(struct.unpack("!4H", pkt[12:20])) + 17 + 12) % 0xFFFF
    pkt[26:28] = pseudo.to_bytes(2, "big")
    vnet = VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6)
    _, [(iov, _)] = transmit(routes_of(A_NET, B_NET, B_IP, False), vnet, pkt, len(pkt))
    out = bytes(iov[0])
    assert reference_checksum(out[12:20] + b"\0\x11\0\x0c" + out[20:]) in (0, 0xFFFF)


@pytest.mark.parametrize(
    ("vnet", "expected"),
    [
        (VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 200), Drop.BAD_OFFLOAD),
        (VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, 900, 16), Drop.BAD_OFFLOAD),
        (VNET.pack(0, 3, 0, 1400, 0, 0), Drop.BAD_OFFLOAD),  # UDP fragmentation offload
        (VNET.pack(0, GSO_TCPV4 | 0x80, 52, 1400, 20, 16), Drop.BAD_OFFLOAD),  # ECN
    ],
)
def test_transmit_refuses_bad_offload_requests(vnet: bytes, expected: Drop) -> None:
    pkt = tcp_packet(b"hello")
    assert transmit(routes_of(A_NET, B_NET, B_IP, False), vnet, pkt, len(pkt)) is expected


def test_transmit_unknown_destination_is_answered() -> None:
    out = Read(tcp_packet(b"x", dst="10.244.9.9"), gso_type=GSO_NONE).transmit(A)
    assert isinstance(out, Reply) and out.reason is Drop.NO_PEER


# -- ingress: coalescing ----------------------------------------------------------------------


RX_PATHS = ["flat", "own-layout", "other-hl", "other-seg", "short-heads"]


def rx(
    path: str,
    routes: Routes,
    sender: str,
    dgrams: list[bytes],
    drops: Counter[Drop],
    run: Run | None = None,
) -> tuple[list[list[Buf]], Run | None]:
    """One UDP_GRO receive of `dgrams` (equal-sized but the last) handed to the offload code
    the way `path` says: in one flat buffer (`receive`), or scattered (`receive_scattered`)
    into the layout of its own segments, one that splits them at another header length, one
    whose heads are shorter than any packet header, or one for another segment size."""
    data, seg = b"".join(dgrams), len(dgrams[0])
    if path == "flat":
        buf = bytearray(1 << 17)
        buf[: len(data)] = data
        return receive(routes, sender, 8285, buf, len(data), seg, drops, run)
    hl = {"own-layout": 52, "other-hl": 40, "other-seg": 52, "short-heads": 2}[path]
    sc = Scatter(hl, 1420 if path == "other-seg" else max(seg - hl, 4))
    pos = 0
    for view in sc.iov:  # what recvmsg_into does
        take = min(len(view), len(data) - pos)
        view[:take] = data[pos : pos + take]
        pos += take
    return receive_scattered(routes, sender, 8285, sc, len(data), seg, drops, run)


def rx_all(
    path: str, dgrams: list[bytes], routes: Routes = B, sender: str = A_IP
) -> tuple[list[list[Buf]], Counter[Drop]]:
    """`rx`, with the run it leaves open written too; the writes and the drops."""
    drops: Counter[Drop] = Counter()
    writes, run = rx(path, routes, sender, dgrams, drops)
    return writes + ([run.write()] if run else []), drops


@pytest.mark.parametrize("path", RX_PATHS)
@pytest.mark.parametrize("paylen", [1420 * 44, 1420 * 44 + 1, 1420 * 46, 14200, 3000, 1421])
def test_round_trip_rebuilds_the_super_packet(paylen: int, path: str) -> None:
    payload = os.urandom(paylen)
    sp = tcp_packet(payload)
    _, sends = Read(sp).transmit(A)
    writes, run, drops = [], None, Counter()
    for iov, _ in sends:  # the second send continues the run the first one left open
        more, run = rx(path, B, A_IP, datagrams([(iov, len(iov[0]) + len(iov[1]))]), drops, run)
        writes += more
    assert run is None and not drops  # the last segment carries PSH: the run is closed
    assert len(writes) == 1
    [packet] = packets_of(writes[0])
    assert packet[52:] == payload
    assert packet[8] == 62 and valid(packet)  # decremented by sender and receiver
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)
    assert packet[33] == ACK | PSH
    if len(writes[0]) > 3:
        pseudo = (sum(struct.unpack("!4H", packet[12:20])) + 6 + len(packet) - 20) % 0xFFFF
        assert struct.unpack("!H", packet[36:38])[0] % 0xFFFF == pseudo


@pytest.mark.parametrize("path", RX_PATHS)
def test_a_gro_train_becomes_one_write(path: str) -> None:
    _, [(iov, seg)] = Read(tcp_packet(bytes(1420 * 30))).transmit(A)
    writes, drops = rx_all(path, datagrams([(iov, seg)]))
    assert not drops and len(writes) == 1
    [packet] = packets_of(writes[0])
    assert len(packet) == 52 + 1420 * 30
    if path == "own-layout":  # the whole train's payload written from one buffer
        assert len(writes[0]) <= 5


@pytest.mark.parametrize("path", RX_PATHS)
def test_an_open_run_is_returned_and_ends_where_the_next_receive_does_not_follow(
    path: str,
) -> None:
    first, rest = train(6), train(3, seq=5000 + 6 * 1000 + 1)  # a gap after the first six
    writes, run = rx(path, B, A_IP, first, Counter())
    assert writes == [] and run is not None
    writes, run = rx(path, B, A_IP, rest, Counter(), run)
    assert [len(packets_of(w)[0]) for w in writes] == [52 + 6 * 1000] and run is not None
    assert len(packets_of(run.write())[0]) == 52 + 3 * 1000


@pytest.mark.parametrize(
    ("first_path", "then_path"), [("flat", "own-layout"), ("own-layout", "flat")]
)
def test_a_run_goes_on_across_a_flat_and_a_scattered_receive(
    first_path: str, then_path: str
) -> None:
    """The datapath receives flat after a single datagram and scattered after a train: a
    super-packet's two sends may arrive one each way."""
    _, sends = Read(tcp_packet(os.urandom(1420 * 46))).transmit(A)
    drops: Counter[Drop] = Counter()
    writes, run = rx(first_path, B, A_IP, datagrams(sends[:1]), drops)
    more, run = rx(then_path, B, A_IP, datagrams(sends[1:]), drops, run)
    assert writes == [] and run is None and not drops and len(more) == 1
    [packet] = packets_of(more[0])
    assert len(packet) == 52 + 1420 * 46 and valid(packet)


@pytest.mark.parametrize("path", RX_PATHS)
def test_a_run_continued_by_a_following_train_is_one_write(path: str) -> None:
    first, rest = train(6), train(4, seq=5000 + 6 * 1000)
    writes, run = rx(path, B, A_IP, first, Counter())
    more, run = rx(path, B, A_IP, rest, Counter(), run)
    assert writes == more == [] and run is not None
    [packet] = packets_of(run.write())
    assert packet[52:] == b"".join(d[52:] for d in first + rest)


def train(count: int, mss: int = 1000, seq: int = 5000, **kw: int) -> list[bytes]:
    out = []
    for i in range(count):
        pkt = tcp_packet(bytes([i]) * mss, seq=seq + i * mss, flags=ACK, **kw)
        pkt[8] -= 1  # as a sender's egress leaves it
        pkt[10:12] = b"\0\0"
        pkt[10:12] = checksum(pkt[:20]).to_bytes(2, "big")
        out.append(bytes(pkt))
    return out


@pytest.mark.parametrize("path", RX_PATHS)
def test_a_bad_datagram_in_a_train_is_dropped_and_splits_it(path: str) -> None:
    dgrams = train(10)
    bad = bytearray(dgrams[4])
    bad[12:16] = IPv4Address("10.244.3.3").packed  # spoofed source
    bad[10:12] = b"\0\0"
    bad[10:12] = checksum(bad[:20]).to_bytes(2, "big")
    dgrams[4] = bytes(bad)
    writes, drops = rx_all(path, dgrams)
    assert drops == Counter({Drop.SPOOFED_SOURCE: 1})
    sizes = [len(w) - 2 for w in writes]
    assert sizes == [4, 5]  # seq 5 no longer follows seq 3: a new run
    assert all(p[12:16] == IPv4Address("10.244.1.2").packed for w in writes for p in packets_of(w))


def with_field(d: bytes, off: int, value: bytes) -> bytes:
    b = bytearray(d)
    b[off : off + len(value)] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("off", "value"),
    [(34, b"\x01\xf5"), (28, b"\x00\x00\x07\xd1"), (33, b"\x30"), (1, b"\x10")],
    ids=["window", "ack", "urg", "tos"],
)
@pytest.mark.parametrize("path", RX_PATHS)
def test_a_differing_segment_ends_the_run(off: int, value: bytes, path: str) -> None:
    dgrams = train(8)
    dgrams[5] = with_field(dgrams[5], off, value)
    if off < 20:
        dgrams[5] = with_field(dgrams[5], 10, b"\0\0")
        dgrams[5] = with_field(dgrams[5], 10, checksum(dgrams[5][:20]).to_bytes(2, "big"))
    writes, drops = rx_all(path, dgrams)
    assert not drops and len(writes) >= 2
    payload = b"".join(p[52:] for w in writes for p in packets_of(w))
    assert payload == b"".join(d[52:] for d in dgrams)


@pytest.mark.parametrize("path", RX_PATHS)
def test_a_pushed_segment_closes_the_run_and_a_short_one_ends_the_train(path: str) -> None:
    dgrams = train(8)
    dgrams[3] = with_field(dgrams[3], 33, bytes([ACK | PSH]))
    dgrams.append(train(1, mss=300, seq=13000)[0])
    writes, drops = rx_all(path, dgrams)
    assert not drops and [len(w) - 2 for w in writes] == [4, 5]
    assert packets_of(writes[0])[0][33] == ACK | PSH


@pytest.mark.parametrize("path", RX_PATHS)
def test_pure_acks_are_written_one_by_one_with_partial_checksum(path: str) -> None:
    acks = [bytes(tcp_packet(b"", seq=1, flags=ACK, ack=2000 + i)) for i in range(3)]
    writes, drops = rx_all(path, acks)
    assert not drops and len(writes) == 3
    for w in writes:
        assert VNET.unpack(bytes(w[0])) == (F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16)


@pytest.mark.parametrize("path", RX_PATHS)
def test_a_reference_peer_gets_its_checksums_checked_by_the_kernel(path: str) -> None:
    udp = bytes(ip_packet("10.244.1.2", "10.244.2.2"))
    writes, drops = rx_all(path, [udp], routes=B_REF)
    assert not drops and bytes(writes[0][0]) == PLAIN
    writes, _ = rx_all(path, [udp])  # a capable peer: declared partial
    assert VNET.unpack(bytes(writes[0][0]))[4:] == (20, 6)


@pytest.mark.parametrize("path", RX_PATHS)
@pytest.mark.parametrize("sender", [A_IP, "192.0.2.99"])
def test_an_empty_datagram_is_dropped_and_ends_the_open_run(path: str, sender: str) -> None:
    drops: Counter[Drop] = Counter()
    _, run = rx(path, B, A_IP, train(4), drops)
    assert run is not None
    buf = bytearray(1 << 17)
    writes, run = receive(B, sender, 8285, buf, 0, 0, drops, run)  # no GRO size: seg == n
    assert run is None and len(writes) == 1 and len(packets_of(writes[0])[0]) == 52 + 4000
    writes, run = receive_scattered(B, sender, 8285, Scatter(52, 1000), 0, 0, drops)
    assert writes == [] and run is None
    assert drops == Counter({Drop.SHORT: 2})


@pytest.mark.parametrize("path", RX_PATHS)
def test_unknown_sender_counts_every_datagram(path: str) -> None:
    writes, drops = rx_all(path, train(5), sender="192.0.2.99")
    assert writes == [] and drops == Counter({Drop.UNKNOWN_SENDER: 5})


def short_packet(size: int, proto: int = 1, src: str = "10.244.1.2") -> bytes:
    """A valid IPv4 packet of `size` bytes (20..33: shorter than an IPv4 + TCP header) from A's
    subnet to B's; 28 bytes of ICMP is what `ping -s 0` sends."""
    body = (b"\x08\x00\xf7\xff\x00\x00\x00\x00" if proto == 1 else b"") + bytes(13)
    return bytes(ip_packet(src, "10.244.2.2", proto=proto, payload=body[: size - 20]))


@pytest.mark.parametrize("size", [20, 28, 33])
@pytest.mark.parametrize("proto", [1, 6, 17])
@pytest.mark.parametrize("path", RX_PATHS)
def test_a_short_packet_after_an_open_run_ends_it_and_is_written(
    path: str, proto: int, size: int
) -> None:
    """Issue 12, 3: a peer's next datagram shorter than 34 bytes (`ping -s 0`) while a TCP run
    from it is open, in the next receive or at the end of the same GRO batch."""
    short = short_packet(size, proto)
    drops: Counter[Drop] = Counter()
    _, run = rx(path, B, A_IP, train(4), drops)
    assert run is not None
    writes, run = rx(path, B, A_IP, [short], drops, run)
    assert run is None and not drops
    assert [len(packets_of(w)[0]) for w in writes] == [52 + 4 * 1000, size]
    writes, drops = rx_all(path, [*train(4, seq=90000), short])
    assert not drops and [len(packets_of(w)[0]) for w in writes] == [52 + 4 * 1000, size]


def with_full_csum(pkt: bytes) -> bytes:
    """`pkt` with its TCP checksum complete, as a node without `csum` (the reference) sends it."""
    b = bytearray(pkt)
    b[36:38] = b"\0\0"
    seg = bytes(b[20:])
    b[36:38] = reference_checksum(
        bytes(b[12:20]) + struct.pack("!BBH", 0, 6, len(seg)) + seg
    ).to_bytes(2, "big")
    assert tcp_valid(b)
    return bytes(b)


def corrupted(d: bytes, at: int = 300) -> bytes:
    """`d` with one payload bit flipped and its checksums left as they were."""
    b = bytearray(d)
    b[at] ^= 0x04
    return bytes(b)


def needs_csum_payloads(writes: list[list[Buf]]) -> list[bytes]:
    """The TCP payloads the receiving kernel gets with checksums to compute (NEEDS_CSUM)."""
    return [
        p[52:] for w in writes if VNET.unpack(bytes(w[0]))[0] & F_NEEDS_CSUM for p in packets_of(w)
    ]


def as_arrived(write: list[Buf]) -> bytes:
    """The one packet of a TUN write with nothing offloaded (PLAIN), as it arrived: TTL one
    more, the header checksum redone."""
    assert bytes(write[0]) == PLAIN and len(write) == 2
    p = bytearray(write[1])
    p[8] += 1
    p[10:12] = b"\0\0"
    p[10:12] = checksum(p[:20]).to_bytes(2, "big")
    return bytes(p)


@pytest.mark.parametrize("bad", [0, 1, 5, 7])
@pytest.mark.parametrize("path", RX_PATHS)
def test_a_corrupted_segment_from_a_peer_without_csum_is_written_as_it_came(
    path: str, bad: int
) -> None:
    """Issue 12, 4: a reference node sends complete TCP checksums; a run joined from its
    segments would be written with NEEDS_CSUM, the kernel computing a fresh checksum over a
    segment corrupted on the way. Its segments are written one by one as they came, nothing
    offloaded: the kernel verifies each, and drops the corrupted one."""
    dgrams = [with_full_csum(d) for d in train(8)]
    dgrams[bad] = corrupted(dgrams[bad])
    writes, drops = rx_all(path, dgrams, routes=B_REF)
    assert dgrams[bad][52:] not in b"".join(needs_csum_payloads(writes))
    assert not drops and [as_arrived(w) for w in writes] == dgrams
    assert [tcp_valid(d) for d in dgrams].count(False) == 1


def with_equal_headers(dgrams: list[bytes]) -> list[bytes]:
    """Segments with complete checksums whose headers all equal the first's but for the
    sequence number, the checksum field too (a payload word balances each): what the
    comparisons of whole headers and columns (`extend_same`, `extend_train`, `extend_heads`)
    would take as they are."""
    first = with_full_csum(dgrams[0])
    out = [first]
    for d in dgrams[1:]:
        b = bytearray(d)
        b[36:38] = first[36:38]
        seg = bytes(b[20:]) + b"\0" * (len(b) % 2)
        words = struct.unpack(f"!{len(seg) // 2}H", seg) + struct.unpack("!4H", b[12:20])
        total = (sum(words) + 6 + len(b) - 20) % 0xFFFF
        word = struct.unpack_from("!H", b, 52)[0]
        struct.pack_into("!H", b, 52, (word - total) % 0xFFFF)
        assert tcp_valid(b) and b[:24] == first[:24] and b[28:52] == first[28:52]
        out.append(bytes(b))
    return out


@pytest.mark.parametrize("path", RX_PATHS)
def test_equal_headers_from_a_peer_without_csum_are_not_joined_either(path: str) -> None:
    dgrams = with_equal_headers(train(8))
    dgrams[5] = corrupted(dgrams[5])
    writes, drops = rx_all(path, dgrams, routes=B_REF)
    assert not drops and [as_arrived(w) for w in writes] == dgrams


@pytest.mark.parametrize("path", RX_PATHS)
def test_a_corrupted_segment_from_a_csum_peer_is_joined_as_before(path: str) -> None:
    """A peer that advertised `csum` leaves its checksums to our kernel (its datagrams' UDP
    checksum covered them in transit): nothing is verified here, the run is one write."""
    dgrams = train(8)
    dgrams[5] = corrupted(dgrams[5])
    writes, drops = rx_all(path, dgrams)
    assert not drops and len(writes) == 1
    assert needs_csum_payloads(writes) == [b"".join(d[52:] for d in dgrams)]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_receive_writes_only_validated_packets(data: st.DataObject) -> None:
    """Random trains (good segments, corrupted and truncated ones, noise): every packet written
    passed the oracle, and every datagram the oracle accepts is written exactly once."""
    base = train(data.draw(st.integers(1, 12)), mss=data.draw(st.sampled_from([8, 100, 1000])))
    seg = len(base[0])
    dgrams = []
    for d in base:
        d = bytearray(d)
        kind = data.draw(st.sampled_from(["good", "good", "good", "flip", "noise"]))
        if kind == "flip":
            d[data.draw(st.integers(0, seg - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "noise":
            d = bytearray(data.draw(st.binary(min_size=seg, max_size=seg)))
        dgrams.append(bytes(d))
    if data.draw(st.booleans()):
        dgrams[-1] = dgrams[-1][: data.draw(st.integers(1, seg))]
    expected = [d for d in dgrams if plain_oracle(d)]
    writes, drops = rx_all(data.draw(st.sampled_from(RX_PATHS)), dgrams)
    written = [p for w in writes for p in packets_of(w)]
    assert sum(drops.values()) + len(expected) == len(dgrams)
    payload = b"".join(p[52:] if p[9] == 6 else p for p in written)
    assert payload == b"".join(d[52:] if d[9] == 6 else d for d in expected)


def plain_oracle(d: bytes) -> bool:
    """Node B's ingress validation for datagrams from A, written the obvious way."""
    if len(d) < 20 or d[0] >> 4 != 4:
        return False
    ihl = (d[0] & 0x0F) * 4
    return (
        20 <= ihl <= len(d)
        and struct.unpack("!H", d[2:4])[0] == len(d)
        and reference_checksum(d[:ihl]) == 0
        and d[8] > 1
        and IPv4Address(d[12:16]) in A_NET
        and IPv4Address(d[16:20]) in B_NET
    )


# -- trains -------------------------------------------------------------------------------------

A_T = Routes(NETWORK, 24, A_NET, [Peer(B_NET, IPv4Address(B_IP), 8285, True, True)])
B_T = Routes(NETWORK, 24, B_NET, [Peer(A_NET, IPv4Address(A_IP), 8285, True, True)])
MTU = 1472  # of the TUN: a datagram's UDP payload


def train_of(sp: bytes, mss: int = 1420, routes: Routes = A_T) -> tuple[list[bytes], bytes]:
    """The datagrams `transmit` sends for the super-packet `sp` read from the TUN, and the
    packet as sent (TTL decremented)."""
    buf = bytearray(1 << 17)
    buf[: len(sp)] = sp
    gathers = Gathers(buf, MTU)
    vnet = VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, 52, mss, 20, 16)
    out = transmit(routes, vnet, buf, len(sp), gathers)
    assert isinstance(out, tuple)
    return datagrams(out[1]), bytes(buf[: len(sp)])


def receive_trains(
    dgrams: list[bytes],
    splits: list[int] | None = None,
    trains: Trains | None = None,
    routes: Routes = B_T,
    sender: str = A_IP,
) -> tuple[list[list[Buf]], Counter[Drop]]:
    """Hand `dgrams` to `Trains.receive` in receives of splits[i] datagrams (all in one by
    default), each put where a receive into the train layout puts it."""
    trains = trains or Trains(MTU)
    drops: Counter[Drop] = Counter()
    writes: list[list[Buf]] = []
    splits = splits or [len(dgrams)]
    at = 0
    for k in splits:
        part = dgrams[at : at + k]
        at += k
        sc = Scatter(TAG_LEN, MTU - TAG_LEN)
        data = b"".join(part)
        sc.load(data)
        got, used = trains.receive(routes, sender, 8285, sc, len(data), len(part[0]), drops)
        writes += [[bytes(b) for b in w] for w in got]  # copied: the next receive reuses sc
        assert used == len(part)
    return writes, drops


def assert_train_write(write: list, sent: bytes) -> None:
    """`write` is the TUN write of the packet `sent`: a TCP super-packet cut at the TUN MTU,
    its TTL one less (header checksum still valid), its TCP checksum the pseudo-header sum."""
    vnet, pkt = VNET.unpack(write[0]), bytearray(write[1])
    assert len(write) == 2 and vnet == (F_NEEDS_CSUM, GSO_TCPV4, 52, MTU - 52, 20, 16)
    assert len(pkt) == len(sent) and pkt[8] == sent[8] - 1 and checksum(pkt[:20]) == 0
    pseudo = (sum(struct.unpack("!4H", pkt[12:20])) + 6 + len(pkt) - 20) % 0xFFFF
    assert struct.unpack("!H", pkt[36:38])[0] % 0xFFFF == pseudo
    assert pkt[20:36] == sent[20:36] and pkt[38:] == sent[38:]  # the TCP header and payload


@pytest.mark.parametrize("paylen", [1420 * 46, 1420 * 45 + 7, 3000, 1421])
def test_a_super_packet_goes_as_one_train_of_tagged_chunks(paylen: int) -> None:
    dgrams, sent = train_of(tcp_packet(os.urandom(paylen), flags=ACK))
    assert all(len(d) == MTU for d in dgrams[:-1]) and len(dgrams[-1]) <= MTU
    assert sum(map(len, dgrams)) <= MAX_TRAIN_PAYLOAD  # one send, cut by no device
    ident = dgrams[0][0] & 0x0F
    last = len(dgrams) - 1
    assert [d[:2] for d in dgrams] == [
        bytes((0xF0 | ident, i | (0x80 if i == last else 0))) for i in range(len(dgrams))
    ]
    assert b"".join(d[2:] for d in dgrams) == sent


def test_trains_go_only_to_peers_that_advertise_them_and_only_when_they_fit() -> None:
    sp = tcp_packet(os.urandom(1420 * 46), flags=ACK)
    plain, _ = train_of(sp, routes=A)  # a capable peer without CAP_TRAIN
    assert len(plain) == 46 and all(d[0] == 0x45 for d in plain)
    small, _ = train_of(tcp_packet(os.urandom(536 * 122), flags=ACK), mss=536)
    assert all(d[0] == 0x45 for d in small)  # 122 chunks: more than one send takes


@pytest.mark.parametrize(
    "splits",
    [None, [1, 44], [20, 25], [44, 1], [1] * 45],
    ids=["one", "1+44", "20+25", "44+1", "each"],
)
def test_a_train_is_one_super_packet_write_however_it_is_received(splits) -> None:
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 46), flags=ACK))
    writes, drops = receive_trains(dgrams, splits)
    assert not drops and len(writes) == 1
    assert_train_write(writes[0], sent)


def test_a_lost_chunk_drops_its_train_and_the_next_one_still_arrives() -> None:
    trains = Trains(MTU)
    first, _ = train_of(tcp_packet(os.urandom(1420 * 30), flags=ACK))
    second, sent = train_of(tcp_packet(os.urandom(1420 * 30), seq=99999, flags=ACK))
    second = [bytes((0xF0 | (second[0][0] + 1) & 0x0F,)) + d[1:] for d in second]  # next id
    writes, drops = receive_trains(first[:10] + first[11:], [10, 10], trains)
    assert writes == [] and drops[Drop.BAD_TRAIN] >= 10
    writes, drops = receive_trains(second, None, trains)
    assert not drops and len(writes) == 1
    assert_train_write(writes[0], sent)


@pytest.mark.parametrize(
    ("routes", "sender", "reason"),
    [
        (B, A_IP, Drop.BAD_TRAIN),  # A never advertised CAP_TRAIN to B
        (  # nor CAP_PARTIAL_CSUM (`plan` makes no such peer): a train is written partial
            Routes(NETWORK, 24, B_NET, [Peer(A_NET, IPv4Address(A_IP), 8285, False, True)]),
            A_IP,
            Drop.BAD_TRAIN,
        ),
        (B_T, "192.0.2.99", Drop.UNKNOWN_SENDER),
    ],
)
def test_trains_from_whom_they_may_not_come_are_dropped(routes, sender, reason) -> None:
    dgrams, _ = train_of(tcp_packet(os.urandom(5000), flags=ACK))
    writes, drops = receive_trains(dgrams, routes=routes, sender=sender)
    assert writes == [] and drops == Counter({reason: len(dgrams)})


@pytest.mark.parametrize(
    ("src", "dst", "reason"),
    [
        ("10.244.9.2", "10.244.2.2", Drop.SPOOFED_SOURCE),
        ("10.244.1.2", "10.244.3.2", Drop.NOT_FOR_US),
    ],
)
def test_a_train_must_hold_a_valid_packet_from_the_peer(src: str, dst: str, reason) -> None:
    routes = Routes(
        NETWORK,
        24,
        A_NET,
        [Peer(IPv4Network("10.244.0.0/16"), IPv4Address(B_IP), 8285, True, True)],
    )
    dgrams, _ = train_of(tcp_packet(os.urandom(5000), src=src, dst=dst, flags=ACK), routes=routes)
    writes, drops = receive_trains(dgrams)
    assert writes == [] and drops == Counter({reason: 1})


@settings(max_examples=300)
@given(st.data())
def test_fuzzed_trains_never_raise_and_write_only_valid_packets(data) -> None:
    """Chunks lost, repeated, reordered, their bytes changed, received in any batches: no
    exception, and whatever is written is a whole valid packet from A's subnet to B's; the
    very packet sent unless bytes were changed (the outer UDP checksum's job)."""
    sp = tcp_packet(os.urandom(data.draw(st.integers(100, 1420 * 46))), flags=ACK)
    dgrams, sent = train_of(sp)
    dgrams = (
        data.draw(st.lists(st.sampled_from(dgrams), max_size=60))
        if data.draw(st.booleans())
        else list(dgrams)
    )
    changes = data.draw(st.integers(0, 3))
    for _ in range(changes):
        if dgrams:
            i = data.draw(st.integers(0, len(dgrams) - 1))
            d = bytearray(dgrams[i])
            d[data.draw(st.integers(0, len(d) - 1))] = data.draw(st.integers(0, 255))
            dgrams[i] = bytes(d)
    trains, drops = Trains(MTU), Counter()
    at = 0
    while at < len(dgrams):
        k = data.draw(st.integers(1, len(dgrams) - at))
        part = dgrams[at : at + k]
        at += k
        if any(len(d) != len(part[0]) for d in part[:-1]) or len(part[-1]) > len(part[0]):
            continue  # no receive batches datagrams of unequal sizes
        if len(part[0]) <= TAG_LEN:
            continue
        sc = Scatter(TAG_LEN, len(part[0]) - TAG_LEN)  # the layout for this receive
        raw = b"".join(part)
        sc.load(raw)
        got, used = trains.receive(B_T, A_IP, 8285, sc, len(raw), len(part[0]), drops)
        for write in got:
            pkt = bytearray(write[1])
            pkt[8] += 1  # as it arrived
            ttl_fixed = bytearray(pkt)
            ttl_fixed[10:12] = b"\0\0"
            ttl_fixed[10:12] = checksum(ttl_fixed[:20]).to_bytes(2, "big")
            assert B_T.check(A_IP, ttl_fixed, 0, len(ttl_fixed)) is None
            assert checksum(bytes(write[1][:20])) == 0
            if not changes:
                assert_train_write(write, sent)


@pytest.mark.parametrize("splits", [None, [5, 40]], ids=["one receive", "two"])
def test_chunks_out_of_order_are_never_joined(splits) -> None:
    """Two chunks swapped keep the packet's length and header: only the tags tell, and
    joining them would hand TCP a corrupt payload under a checksum declared verified."""
    dgrams, _ = train_of(tcp_packet(os.urandom(1420 * 46), flags=ACK))
    dgrams[7], dgrams[8] = dgrams[8], dgrams[7]
    writes, drops = receive_trains(dgrams, splits)
    assert writes == [] and drops[Drop.BAD_TRAIN] > 0


@pytest.mark.parametrize("ident", [0, 15, 16, 31])
def test_train_ids_use_five_bits_and_round_trip(ident: int) -> None:
    tags = train_tags(3, ident)
    assert [tags[i] & 0x0F | (tags[i + 1] & 0x40) >> 2 for i in (0, 2, 4)] == [ident] * 3
    assert [tags[i + 1] & 0x3F for i in (0, 2, 4)] == [0, 1, 2] and tags[5] & 0x80
    dgrams, sent = train_of(tcp_packet(os.urandom(4000), flags=ACK))
    dgrams = [bytes(tags[2 * i : 2 * i + 2]) + d[2:] for i, d in enumerate(dgrams)]
    writes, drops = receive_trains(dgrams, [1, 2])
    assert not drops and len(writes) == 1
    assert_train_write(writes[0], sent)
