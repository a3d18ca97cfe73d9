"""The udp receive state machine (`receiver.Receiver`) driven in memory, the train admission
shared by it and `Trains`, and the header helpers every udp module uses (`ipv4`)."""

from __future__ import annotations

import os
from collections import Counter
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.udp.core import Drop, Peer, Routes
from backends.udp.ipv4 import (
    ACK,
    IP_HL,
    PSH,
    TCP_HL,
    checksum,
    is_fragment,
    is_later_fragment,
)
from backends.udp.receiver import (
    CLOSE,
    LAYOUT,
    OPEN,
    PACKETS,
    PATHS,
    READY,
    TRAINS,
    Receiver,
)
from backends.udp.trains import MIN_TRAIN_CHUNK, TAG_LEN, admit

from .test_udp_offload import (
    A_IP,
    A_NET,
    B_NET,
    B_T,
    MTU,
    NETWORK,
    B,
    packets_of,
    short_packet,
    tcp_packet,
    train,
    train_of,
)

SRC = (A_IP, 8285)


# -- ipv4: one helper each for header lengths and fragments ----------------------------------


def test_header_length_tables_are_the_header_fields() -> None:
    assert [IP_HL[b] for b in range(256)] == [(b & 0x0F) * 4 for b in range(256)]
    assert [TCP_HL[b] for b in range(256)] == [(b >> 4) * 4 for b in range(256)]


@given(st.booleans(), st.booleans(), st.integers(0, 0x1FFF))
def test_fragment_tests_read_mf_and_the_offset(df: bool, mf: bool, offset: int) -> None:
    word = (0x4000 if df else 0) | (0x2000 if mf else 0) | offset
    buf = bytes(6) + word.to_bytes(2, "big")
    assert is_fragment(buf, 0) == (mf or offset > 0)
    assert is_later_fragment(buf, 0) == (offset > 0)


# -- trains.admit: one admission, before any layout ------------------------------------------


def routes_with(partial: bool, train_: bool) -> Routes:
    return Routes(NETWORK, 24, B_NET, [Peer(A_NET, IPv4Address(A_IP), 8285, partial, train_)])


@pytest.mark.parametrize(
    ("routes", "src", "n", "seg", "expected"),
    [
        (B_T, SRC, 3 * MTU, MTU, "peer"),
        (B_T, SRC, TAG_LEN + 1, TAG_LEN + 1, "peer"),  # one datagram: any size with a tag
        (B_T, SRC, TAG_LEN, TAG_LEN, Drop.BAD_TRAIN),  # a tag and nothing else
        (B_T, SRC, 3 * 40, 40, Drop.BAD_TRAIN),  # several, chunks too small for a header
        (B_T, SRC, 3 * (TAG_LEN + MIN_TRAIN_CHUNK), TAG_LEN + MIN_TRAIN_CHUNK, "peer"),
        (B_T, ("192.0.2.99", 8285), 3 * MTU, MTU, Drop.UNKNOWN_SENDER),
        (B_T, (A_IP, 9999), 3 * MTU, MTU, Drop.BAD_SENDER_PORT),
        (B, SRC, 3 * MTU, MTU, Drop.BAD_TRAIN),  # csum, no train
        (routes_with(False, True), SRC, 3 * MTU, MTU, Drop.BAD_TRAIN),  # train, no csum
    ],
)
def test_admit(routes: Routes, src: tuple[str, int], n: int, seg: int, expected) -> None:
    got = admit(routes, src[0], src[1], n, seg)
    assert (got if isinstance(got, Drop) else "peer") == expected


# -- receiver: the table, then the machine driven receive by receive -------------------------


def test_every_path_reads_off_the_table() -> None:
    """What the module doc's table says, and only READY's packets-only path can leave a run
    open (it is the only one that does not end with CLOSE or TRAINS)."""
    assert PATHS == {
        READY: ((PACKETS, LAYOUT), (TRAINS,), (PACKETS, CLOSE, TRAINS)),
        OPEN: ((PACKETS, CLOSE), (CLOSE, TRAINS), (PACKETS, CLOSE, TRAINS)),
    }
    open_ended = [(s, i) for s, row in PATHS.items() for i, p in enumerate(row) if p[-1] == LAYOUT]
    assert open_ended == [(READY, 0)]


def deliver(rx: Receiver, dgrams: list[bytes], routes: Routes = B, src=SRC) -> list:
    """One receive of `dgrams` (a GRO batch) put where the machine wants it, as recvmsg_into
    does; the writes, copied (the next receive reuses the buffers)."""
    data = b"".join(dgrams)
    at = 0
    for part in rx.iov:
        take = min(len(part), len(data) - at)
        if take <= 0:
            break
        part[:take] = data[at : at + take]
        at += take
    writes = rx.receive(routes, len(data), len(dgrams[0]), src)
    return [[bytes(b) for b in w] for w in writes]


def sizes(writes: list) -> list[int]:
    """The length of the packet each write carries (a super-packet's whole)."""
    return [sum(map(len, w[1:])) for w in writes]


@pytest.fixture
def rx() -> Receiver:
    return Receiver(MTU, Counter(), bytearray(1 << 17))


def test_a_single_datagram_leaves_the_machine_ready_and_flat(rx: Receiver) -> None:
    ack = bytes(tcp_packet(b"", flags=ACK))
    assert sizes(deliver(rx, [ack])) == [len(ack)]
    assert (rx.state, rx.iov) == (READY, rx.flat) and not rx.drops


def test_an_open_run_waits_for_its_continuation_in_the_second_buffer(rx: Receiver) -> None:
    second = rx._pair[1]
    assert deliver(rx, train(4)) == []  # full-size, no PSH: the run stays open
    assert rx.state is OPEN and rx.iov is second.iov  # the pair as it was: the run is flat
    assert sizes(deliver(rx, train(2, seq=9000))) == [52 + 6000]  # joined, then written
    assert rx.state is READY and rx.iov is rx._pair[0].iov  # after a batch: scattered ...
    assert (rx._pair[0].hl, rx._pair[0].mss) == (52, 1000)  # ... for its segments


@pytest.mark.parametrize("event", ["nothing", "truncated"])
def test_no_continuation_writes_the_run(rx: Receiver, event: str) -> None:
    deliver(rx, train(4))
    writes = getattr(rx, event)()
    assert sizes(writes) == [52 + 4000] and rx.state is READY
    assert rx.drops == (Counter({Drop.TRUNCATED: 1}) if event == "truncated" else Counter())
    assert getattr(rx, event)() == []  # in READY: nothing to write


def test_a_continuation_from_another_sender_writes_the_run_first(rx: Receiver) -> None:
    routes = Routes(
        NETWORK,
        24,
        B_NET,
        [
            Peer(A_NET, IPv4Address(A_IP), 8285, True),
            Peer(IPv4Network("10.244.0.0/24"), IPv4Address("192.0.2.13"), 8285, True),
        ],
    )
    deliver(rx, train(4), routes)
    other = bytes(tcp_packet(b"", src="10.244.0.9", flags=ACK))
    writes = deliver(rx, [other], routes, ("192.0.2.13", 8285))
    assert sizes(writes) == [52 + 4000, len(other)] and rx.state is READY


def test_packets_then_trains_in_one_receive_close_the_run_before_the_trains(
    rx: Receiver,
) -> None:
    packet = bytes(tcp_packet(os.urandom(MTU - 52), flags=ACK))
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 10), seq=50000, flags=ACK))
    writes = deliver(rx, [packet, *dgrams[:-1]], B_T)
    writes += deliver(rx, dgrams[-1:], B_T)
    assert sizes(writes) == [MTU, len(sent)] and not rx.drops
    assert rx.trains.written == 1 and rx.state is READY


def test_a_train_lays_the_next_receive_out_for_trains(rx: Receiver) -> None:
    dgrams, _ = train_of(tcp_packet(os.urandom(1420 * 46), flags=ACK))
    assert len(deliver(rx, dgrams, B_T)) == 1
    assert rx.iov is rx._pair[0].iov and (rx._pair[0].hl, rx._pair[0].seg) == (TAG_LEN, MTU)
    assert len(deliver(rx, dgrams, B_T)) == 1  # taken where it lies this time
    assert rx.trains.written == 2 and not rx.drops


def test_reset_forgets_the_open_run(rx: Receiver) -> None:
    deliver(rx, train(4))
    rx.reset()
    assert (rx.state, rx.run, rx.iov) == (READY, None, rx.flat)
    assert rx.nothing() == []


def test_a_short_packet_continuing_a_run_ends_it_and_is_written(rx: Receiver) -> None:
    deliver(rx, train(4))
    ping = short_packet(28)
    assert sizes(deliver(rx, [ping])) == [52 + 4000, 28] and not rx.drops


def test_flags_of_the_run_survive_the_machine(rx: Receiver) -> None:
    dgrams = train(3)
    last = bytearray(train(1, seq=5000 + 3000)[0])
    last[33] = ACK | PSH
    last[10:12] = b"\0\0"
    last[10:12] = checksum(last[:20]).to_bytes(2, "big")
    [write] = deliver(rx, [*dgrams, bytes(last)])
    assert packets_of(write)[0][33] == ACK | PSH and rx.state is READY


def test_an_empty_continuation_is_dropped_and_the_run_written(rx: Receiver) -> None:
    """As an empty datagram in READY (`runs.receive`): counted as SHORT, and the open run
    ends with it, written, not lost."""
    deliver(rx, train(4))
    writes = rx.receive(B, 0, 0, SRC)  # an empty datagram carries no GRO size either
    assert sizes(writes) == [52 + 4000] and rx.state is READY
    assert rx.drops == Counter({Drop.SHORT: 1})


# -- Receiver.datagram: the low-load shortcut, the same outcome as `receive` -----------------


def _datagrams() -> list[list[bytes]]:
    """Receives to feed both machines: single datagrams of every kind, and batches."""
    sp = bytes(tcp_packet(os.urandom(3 * 1420), flags=ACK))
    chunks, _ = train_of(sp)
    seg = train(3, mss=1000, seq=90000)
    return [
        [short_packet(28)],  # ping -s 0
        [short_packet(33, proto=17)],
        [bytes(tcp_packet(b"", flags=ACK))],  # an ACK
        [bytes(tcp_packet(b"request", flags=ACK | PSH))],  # a request
        seg[:1],  # a full-size data segment: it opens a run
        seg[1:2],  # ... its continuation
        seg,  # a batch: the next receive is laid out for its segments
        chunks[:1],  # a train's first chunk alone
        chunks,  # a whole train
        [b"\x45garbage"],
        [b""],
        [os.urandom(60)],
    ]


def _feed(rx: Receiver, dgrams: list[bytes], shortcut: bool) -> list:
    data = b"".join(dgrams)
    at = 0
    for part in rx.iov:
        take = min(len(part), len(data) - at)
        if take <= 0:
            break
        part[:take] = data[at : at + take]
        at += take
    if shortcut:
        assert len(dgrams) == 1 and rx.iov is rx.flat
        writes = rx.datagram(B_T, len(data), SRC)
    else:
        writes = rx.receive(B_T, len(data), len(dgrams[0]), SRC)
    return [[bytes(b) for b in w] for w in writes]


def _looks(rx: Receiver) -> tuple:
    return (
        rx.state,
        rx.iov is rx.flat,
        [rx.iov is sc.iov for sc in rx._pair],  # which buffer of the pair
        [len(b) for b in rx.iov],
        (rx._pair[0].hl, rx._pair[0].mss),
        rx.run is None or (rx.run.seq, rx.run.total),
        dict(rx.drops),
        rx.trains.written,
    )


@given(st.lists(st.integers(0, 11), max_size=25))
def test_one_datagram_by_the_shortcut_is_what_the_machine_makes_of_it(picks: list[int]) -> None:
    """Two machines fed the same receives: one through `receive` only, the other through
    `datagram` whenever a single datagram comes into the flat buffer; the same writes, drops,
    state and layouts after every receive."""
    kinds = _datagrams()
    full, short = (Receiver(MTU, Counter(), bytearray(1 << 17)) for _ in range(2))
    for pick in picks:
        dgrams = kinds[pick]
        shortcut = len(dgrams) == 1 and short.iov is short.flat
        assert _feed(short, dgrams, shortcut) == _feed(full, dgrams, False)
        assert _looks(short) == _looks(full)
