"""Trains, without I/O: a TCP super-packet sent as one train of tagged chunks between peers
that both advertise CAP_TRAIN (`train`), and put back together on the receiving side (`Trains`).

Theory of operation. A TCP super-packet cut at the inner MSS repeats its 40-60 header bytes in
every datagram: a 64 KB one takes 46 datagrams of a 1500-byte MTU, more than one UDP_SEGMENT
send carries, so every super-packet cost two sends. A train carries the super-packet as read
(its one header, TTL decremented, TCP checksum partial) cut into equal chunks, each behind a
2-byte tag: 0xF0 | the train id's low 4 bits (the high nibble, 15, is no IP version, so no
train datagram passes for a packet), then the chunk's index (6 bits) | the id's fifth bit << 6
| TRAIN_LAST on the train's last chunk. 46 datagrams of 1500 bytes carry 65,372 bytes and their
tags in one send.

The limit of one send is not the IPv4 one (65,507 bytes of UDP payload): a GSO packet the size
of a device's gso_max_size (64 KiB, link header included) is cut in software on the way,
datagram by datagram. MAX_TRAIN_PAYLOAD leaves room for an Ethernet and a VLAN header.

The receiver admits a train only from a peer that advertised CAP_TRAIN (`admit`, decided
before any buffer is laid out for it: strangers cost no layout), checks the tags (in order, no
gap, one train at a time per sender; a train spread over receives is copied aside as it
comes), then demands that the whole be one valid TCP/IPv4 packet from the sender's subnet to
ours (`Routes.check`) before writing it; anything else is dropped and counted (`bad_train`),
and TCP resends.
"""

from __future__ import annotations

from collections import Counter
from typing import Final

from .core import Drop, Peer, Routes
from .ipv4 import IP_HL, IPPROTO_TCP, TCP_HL, U16, Buf, decrement_ttl, is_fragment, pseudo_sum
from .layouts import MAX_SEGMENTS, Gathers, Scatter, Send
from .tso import shape
from .vnet import F_NEEDS_CSUM, GSO_TCPV4, VNET

TAG_LEN: Final = 2
TRAIN_MAGIC: Final = 0xF0  # first byte & 0xF0 of every train datagram
TRAIN_LAST: Final = 0x80  # in the index byte
TRAIN_ID_HIGH: Final = 0x40  # in the index byte: the train id's fifth bit
MAX_TRAIN_PAYLOAD: Final = 0x10000 - 28 - 32
MIN_TRAIN_MSS: Final = 88  # TCP's smallest MSS (Linux TCP_MIN_MSS): no write cuts finer than that
MIN_TRAIN_CHUNK: Final = 68  # a chunk holds any IPv4 + TCP header; smaller datagrams: no trains
IS_TRAIN: Final = bytes(1 if b & 0xF0 == TRAIN_MAGIC else 0 for b in range(256))  # first bytes
_LAST_FLAGS = bytes(1 if b & TRAIN_LAST else 0 for b in range(256))
_TAGS: dict[tuple[int, int], bytes] = {}


def train_tags(count: int, ident: int) -> bytearray:
    """The tags of a train of `count` chunks, back to back."""
    high = TRAIN_ID_HIGH if ident & 0x10 else 0
    tags = _TAGS.get((count, high))
    if tags is None:
        if len(_TAGS) >= 64:
            _TAGS.clear()
        last = count - 1
        tags = _TAGS[count, high] = b"".join(
            bytes((TRAIN_MAGIC, i | high | (TRAIN_LAST if i == last else 0))) for i in range(count)
        )
    out = bytearray(tags)
    out[0::TAG_LEN] = bytes((TRAIN_MAGIC | ident & 0x0F,)) * count
    return out


def train(buf: bytearray, n: int, mss: int, gathers: Gathers) -> list[Send] | None:
    """The send of the TCP/IPv4 super-packet buf[:n] as one train of `gathers.dgram`-byte
    datagrams; None when it does not fit one send or is malformed (then `segment` it)."""
    dgram = gathers.dgram
    chunk = dgram - TAG_LEN
    count = -(-n // chunk) if chunk >= MIN_TRAIN_CHUNK else 0
    if (
        not 2 <= count <= MAX_SEGMENTS
        or n + count * TAG_LEN > MAX_TRAIN_PAYLOAD
        or gathers.buf is not buf
        or shape(buf, 0, n, mss) is None
    ):
        return None
    g = gathers.whole(TAG_LEN, chunk)
    gathers.train_id = ident = (gathers.train_id + 1) & 0x1F
    gathers.trains += 1
    g.heads[: count * TAG_LEN] = train_tags(count, ident)
    iov = g.iov[: 2 * count]
    iov[-1] = memoryview(buf)[(count - 1) * chunk : n]
    return [(iov, dgram)]


def admit(routes: Routes, ip: str, port: int, n: int, seg: int) -> Peer | Drop:
    """The peer whose train datagrams (n bytes received, `seg` bytes each but the last) come
    from (ip, port), or why none of them is taken: not a peer, or one that did not advertise
    CAP_TRAIN and CAP_PARTIAL_CSUM (a train is written with its checksum partial), or
    datagrams too small to hold a tag and, when there are several, a chunk of a header."""
    peer = routes.sender(ip, port)
    if isinstance(peer, Drop):
        return peer
    if (
        not (peer.train and peer.partial_csum)
        or n <= TAG_LEN
        or (n > seg and seg - TAG_LEN < MIN_TRAIN_CHUNK)
    ):
        return Drop.BAD_TRAIN
    return peer


class _Pending:
    """A train spread over receives: its id, the next index, the bytes so far."""

    __slots__ = ("ident", "next", "buf", "filled")

    def __init__(self, ident: int) -> None:
        self.ident, self.next = ident, 0
        self.buf = bytearray(0x10000)
        self.filled = 0


class Trains:
    """The receiving end of `train`: reassembles the trains of successive receives, laid out
    by a `Scatter` of TAG_LEN-byte heads (the tags, back to back) and chunk-sized bodies (the
    chunks, back to back). A train complete within one receive is written from the receive
    buffer as one piece; one spread over receives (a real network's receive batches end
    where they will) is copied aside as it comes. One train in progress per sender: a chunk
    out of place or a missing one drops what it concerns (TCP resends); only a loss of exactly
    32 equal trains' worth of datagrams, the id's period, could join two trains unnoticed
    (README, udp options). A whole train must be one valid TCP/IPv4 packet from the sender's
    subnet to ours (`Routes.check`); it is written cut at `mtu` (this node's TUN MTU, the
    inner MTU of every node) less its headers."""

    LIMIT = 64  # senders with a train in progress

    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.written = 0  # trains written
        self._pending: dict[str, _Pending] = {}

    def _drop_pending(self, ip: str, drops: Counter[Drop]) -> None:
        pending = self._pending.pop(ip, None)
        if pending is not None:
            drops[Drop.BAD_TRAIN] += pending.next  # a train cut short: its chunks are lost

    def receive(
        self,
        routes: Routes,
        ip: str,
        port: int,
        sc: Scatter,
        n: int,
        seg: int,
        drops: Counter[Drop],
    ) -> tuple[list[list[Buf]], int]:
        """The writes for the train datagrams at the start of the n bytes received into `sc`
        (datagrams of `seg` bytes but the last, sc laid out as (TAG_LEN, seg - TAG_LEN)), and
        how many datagrams were train datagrams: the caller passes the rest on. All of them
        are dropped unless `admit` takes them."""
        peer = admit(routes, ip, port, n, seg)
        if isinstance(peer, Drop):
            d = -(-n // seg) if seg > 0 else 0
            drops[peer] += d
            return [], d
        return self.take(routes, ip, sc, n, seg, drops)

    def take(
        self, routes: Routes, ip: str, sc: Scatter, n: int, seg: int, drops: Counter[Drop]
    ) -> tuple[list[list[Buf]], int]:
        """`receive` for datagrams `admit` took."""
        d = -(-n // seg)
        chunk, heads, body = seg - TAG_LEN, sc.heads, sc.body_view
        last_len = n - (d - 1) * seg  # of the receive's last datagram, tag included
        writes: list[list[Buf]] = []
        i = 0
        while i < d and heads[i * TAG_LEN] & 0xF0 == TRAIN_MAGIC:
            low, high = heads[i * TAG_LEN], heads[i * TAG_LEN + 1]
            ident, index = low & 0x0F | (high & TRAIN_ID_HIGH) >> 2, high & 0x3F
            pending = self._pending.get(ip)
            if pending is not None and (
                index == 0 or (ident, index) != (pending.ident, pending.next)
            ):
                self._drop_pending(ip, drops)
                pending = None
            if index != 0 and pending is None:
                drops[Drop.BAD_TRAIN] += 1  # a chunk of a train not seen from its start
                i += 1
                continue
            # the chunks up to the train's last one (flagged), or to the end of the receive
            end = heads[i * TAG_LEN + 1 : d * TAG_LEN : TAG_LEN].translate(_LAST_FLAGS).find(1)
            k, complete = (end + 1, True) if end >= 0 else (d - i, False)
            end_len = (last_len if i + k == d else seg) - TAG_LEN  # the chunk of i + k - 1
            tags = train_tags(index + k, ident)[index * TAG_LEN :]
            if not complete:  # the train goes on: no chunk here is its last
                tags[-1] &= ~TRAIN_LAST
            if heads[i * TAG_LEN : (i + k) * TAG_LEN] != tags or (
                not complete and end_len != chunk
            ):
                self._drop_pending(ip, drops)
                drops[Drop.BAD_TRAIN] += 1
                i += 1
                continue
            view = body[i * chunk : i * chunk + (k - 1) * chunk + end_len]
            i += k
            if index == 0 and complete:  # whole here: written from where it lies
                self._write(routes, ip, view, writes, drops)
                continue
            if pending is None:
                if len(self._pending) >= self.LIMIT:
                    self._pending.clear()
                pending = self._pending[ip] = _Pending(ident)
            if pending.filled + len(view) > len(pending.buf):
                self._drop_pending(ip, drops)
                drops[Drop.BAD_TRAIN] += k
                continue
            pending.buf[pending.filled : pending.filled + len(view)] = view
            pending.filled += len(view)
            pending.next = index + k
            if complete:
                del self._pending[ip]
                self._write(routes, ip, memoryview(pending.buf)[: pending.filled], writes, drops)
        return writes, i

    def _write(
        self,
        routes: Routes,
        ip: str,
        pkt: memoryview,
        writes: list[list[Buf]],
        drops: Counter[Drop],
    ) -> None:
        write = _train_write(routes, ip, pkt, self.mtu, drops)
        if write is not None:
            writes.append(write)
            self.written += 1


def _train_write(
    routes: Routes, ip: str, pkt: memoryview, mtu: int, drops: Counter[Drop]
) -> list[Buf] | None:
    """The TUN write of a whole train: one TCP/IPv4 packet (validated here) written as a
    super-packet of segments that fill `mtu`, TTL decremented, TCP checksum declared partial."""
    n = len(pkt)
    reason = routes.check(ip, pkt, 0, n)
    if reason is not None:
        drops[reason] += 1
        return None
    ihl = IP_HL[pkt[0]]
    hl = ihl + TCP_HL[pkt[ihl + 12]] if n >= ihl + 20 else 0
    if (
        pkt[9] != IPPROTO_TCP
        or is_fragment(pkt, 0)
        or not ihl + 20 <= hl < n
        or mtu - hl < MIN_TRAIN_MSS
    ):
        drops[Drop.BAD_TRAIN] += 1
        return None
    decrement_ttl(pkt, 0)
    U16.pack_into(pkt, ihl + 16, pseudo_sum(pkt[12:20], IPPROTO_TCP, n - ihl))
    return [VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, hl, mtu - hl, ihl, 16), pkt]
