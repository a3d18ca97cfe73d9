"""Batching through virtio-net offloads, without I/O: what to send for one TUN read, what to
write to the TUN for one (GRO) receive.

Theory of operation. The TUN device is opened with a virtio-net header and TCP segmentation
offload, so one read may return a TCP super-packet of up to 64 KB whose checksum is left
partial (`F_NEEDS_CSUM`). `transmit` cuts it into inner packets of the container MTU (the
kernel's TSO rules: sequence numbers advance by `gso_size`; CWR only on the first segment, FIN
and PSH only on the last; a DF packet keeps one IP ID, RFC 6864) so that one `sendmsg` with
`UDP_SEGMENT` sends up to 44 of them as equal-sized datagrams, each carrying exactly one inner
IPv4 packet. The headers of all segments are built at once in a buffer of their own (the
first segment's header repeated, then the columns that differ: sequence numbers, the last
segment's length and flags); `Gather` keeps, per (header length, MSS), the list that
alternates header views and views of the payload as read, so `sendmsg` gathers each datagram
and no Python object is made per segment. A peer that advertised `CAP_PARTIAL_CSUM` gets
TCP/UDP checksums unfinished (its kernel finishes or skips them); any other peer, such as the
reference flanneld, gets them computed here. A peer that also advertised `CAP_TRAIN` gets a
super-packet as one `train` instead: its bytes as read, in tagged chunks, one send (see the
trains section below); `Trains` puts them back together on the receiving side.

`receive` takes the datagrams of one `UDP_GRO` read, validates each (`Routes.check`), and
joins consecutive segments of one TCP stream back into a super-packet written with
`GSO_TCPV4` (a `Run`; one still open at the end may go on with the next read, where the
sender's second `sendmsg` lands), so the receiving kernel handles 64 KB per write as well. A
segment whose header bytes equal those of the already-validated first one but for the
sequence number, which must follow on, is accepted without re-validation (same bytes, same
length, same sender, same verdict); whole trains of them are compared at once. In one flat
buffer that is done 32-bit column by column; `receive_scattered` takes a receive into a
`Scatter`, which puts the headers back to back and the payloads back to back, so a train is
one comparison of its headers and one piece of payload to write. Between capable peers the
TCP/UDP checksum of what is written is declared partial: the outer UDP checksum has covered
the bytes in transit.

Only segments from a peer that advertised `CAP_PARTIAL_CSUM` are joined: the kernel computes
a fresh TCP checksum for a join, which would make good a segment corrupted on its way from a
peer whose datagrams carry complete checksums (the reference). That peer's packets are
written one by one as they came, without NEEDS_CSUM, so the kernel verifies each one;
measured in the lab, that takes less of the agent's CPU than joining them did, and less
than verifying their checksums here in order to join them.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections import Counter
from collections.abc import Callable
from typing import Final, TypeVar

from .core import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Drop,
    Peer,
    Reply,
    Routes,
    checksum,
    decrement_ttl,
    ones_sum,
    pseudo_sum,
)

Buf = bytes | bytearray | memoryview
Send = tuple[list[Buf], int]  # the buffers of one sendmsg and its UDP_SEGMENT size

VNET: Final = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, offset
VNET_LEN: Final = VNET.size
F_NEEDS_CSUM: Final = 1
GSO_NONE, GSO_TCPV4 = 0, 1
PLAIN: Final = bytes(VNET_LEN)  # "nothing offloaded": the kernel checks every checksum

MAX_UDP_PAYLOAD = 0xFFFF - 28  # one UDP_SEGMENT send (IPv4 total length limit)
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels (newer ones allow 128)

FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80
_U16, _U32 = struct.Struct("!H"), struct.Struct("!I")
_LITTLE = sys.byteorder == "little"
_CSUM_FIELD = {IPPROTO_TCP: (16, 20), IPPROTO_UDP: (6, 8)}  # proto: (field offset, min length)


_RAMPS: dict[tuple[int, int], tuple[int, int]] = {}


def _ramp(step: int, count: int) -> tuple[int, int]:
    """(ones, steps): integers of `count` 32-bit words, most significant first, holding 1 in
    every word, and 0, step, 2 * step, ... (each below 2**32)."""
    ramp = _RAMPS.get((step, count))
    if ramp is None:
        if len(_RAMPS) >= 64:
            _RAMPS.clear()
        ones = int.from_bytes(b"\0\0\0\1" * count, "big")
        steps = int.from_bytes(b"".join((i * step).to_bytes(4, "big") for i in range(count)), "big")
        ramp = _RAMPS[step, count] = (ones, steps)
    return ramp


def _progression(first: int, step: int, count: int) -> memoryview:
    """`count` 32-bit sequence numbers first, first + step, ... (mod 2**32), big-endian, as
    32-bit items. Without a wrap, one multiplication and addition of big integers: no word
    carries into the next."""
    if first + step * (count - 1) <= 0xFFFFFFFF:
        ones, steps = _ramp(step, count)
        return memoryview((first * ones + steps).to_bytes(4 * count, "big")).cast("I")
    seqs = array("I", ((first + step * i) & 0xFFFFFFFF for i in range(count)))
    if _LITTLE:
        seqs.byteswap()
    return memoryview(seqs)


def _column(buf: bytearray, word: int, stride: int, values: memoryview) -> None:
    """Store `values` at 32-bit word `word`, `word + stride`, ... of `buf` (at C speed)."""
    memoryview(buf).cast("I")[word::stride][: len(values)] = values


def _is_fragment(buf: Buf, off: int) -> bool:
    return bool((buf[off + 6] << 8 | buf[off + 7]) & 0x3FFF)  # MF or a fragment offset


def finish_csum(buf: bytearray, start: int, field: int, end: int) -> bool:
    """Complete a partial checksum: sum buf[start:end] (the field holds the pseudo-header
    sum) into buf[field:field+2]. False when the offsets fall outside the packet."""
    if not start < end or not start <= field <= end - 2:
        return False
    _U16.pack_into(buf, field, checksum(buf[start:end]) or 0xFFFF)
    return True


def _ip_csum(h: bytearray, off: int, ihl: int) -> None:
    h[off + 10 : off + 12] = b"\0\0"
    _U16.pack_into(h, off + 10, checksum(h[off : off + ihl]))


def _set_length(h: bytearray, off: int, length: int) -> None:
    """Set the total length of the IPv4 header at `off` and patch its checksum (RFC 1624
    eqn. 3: HC' = ~(~HC + ~m + m'))."""
    old = h[off + 2] << 8 | h[off + 3]
    s = (~(h[off + 10] << 8 | h[off + 11]) & 0xFFFF) + (~old & 0xFFFF) + length
    s = (s & 0xFFFF) + (s >> 16)
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    h[off + 2], h[off + 3], h[off + 10], h[off + 11] = length >> 8, length & 0xFF, s >> 8, s & 0xFF


def _headers(
    buf: bytearray, start: int, hl: int, nseg: int, mss: int, partial: bool, out: bytearray
) -> None:
    """Write the nseg headers (hl bytes each, back to back) of the segments of the TCP/IPv4
    super-packet whose header is buf[start:start+hl] to the start of `out`, as the kernel's
    TSO would write them."""
    ihl = t = (buf[start] & 0x0F) * 4
    thl = hl - ihl
    flags = buf[start + t + 13]
    seq0 = _U32.unpack_from(buf, start + t + 4)[0]
    ident = _U16.unpack_from(buf, start + 4)[0]
    fixed_id = buf[start + 6] & 0x40  # DF: the ID has no meaning (RFC 6864), keep one
    total = _U16.unpack_from(buf, start + 2)[0]
    pseudo = ones_sum(buf[start + 12 : start + 20]) + IPPROTO_TCP
    tail = total - hl - (nseg - 1) * mss  # the last segment's payload (IP length as read)

    tmpl = bytearray(buf[start : start + hl])
    _set_length(tmpl, 0, hl + mss)  # the header as read has a valid checksum: patch it
    tmpl[t + 13] = flags & ~(FIN | PSH | CWR)
    _U16.pack_into(tmpl, t + 16, ((pseudo + thl + mss) % 0xFFFF or 0xFFFF) if partial else 0)
    hdrs = out
    hdrs[: nseg * hl] = tmpl * nseg
    if nseg > 1:
        _column(hdrs, (t + 4) // 4, hl // 4, _progression(seq0, mss, nseg))
    if not fixed_id:
        for i in range(1, nseg):
            _U16.pack_into(hdrs, i * hl + 4, (ident + i) & 0xFFFF)
            _ip_csum(hdrs, i * hl, ihl)
    last = (nseg - 1) * hl
    if nseg > 1:
        hdrs[t + 13] = flags & ~(FIN | PSH)
        hdrs[last + t + 13] = flags & ~CWR
    else:
        hdrs[t + 13] = flags
    _set_length(hdrs, last, hl + tail)
    if partial:
        _U16.pack_into(hdrs, last + t + 16, (pseudo + thl + tail) % 0xFFFF or 0xFFFF)


def _tcp_csum(buf: Buf, ihl: int, header: Buf, payload: Buf) -> None:
    """Fill in the full TCP checksum of one segment (its checksum field reads 0)."""
    pseudo = ones_sum(header[12:20]) + IPPROTO_TCP + len(header) - ihl + len(payload)
    s = pseudo + ones_sum(header[ihl:]) + ones_sum(payload)
    _U16.pack_into(buf, ihl + 16, -s % 0xFFFF or 0xFFFF)


def _shape(buf: bytearray, start: int, length: int, mss: int) -> tuple[int, int] | None:
    """(header length, segment count) of the TCP/IPv4 super-packet of `length` bytes at
    `start` (only its header is read) to be cut into mss-byte segments; None if malformed."""
    ihl = (buf[start] & 0x0F) * 4
    if buf[start + 9] != IPPROTO_TCP or mss <= 0 or length < ihl + 20:
        return None
    thl = (buf[start + ihl + 12] >> 4) * 4
    hl = ihl + thl
    paylen = length - hl
    if thl < 20 or paylen <= 0 or _U16.unpack_from(buf, start + 2)[0] != length:
        return None
    return hl, -(-paylen // mss)


def _per_send(seg: int) -> int:
    return max(1, min(MAX_SEGMENTS, MAX_UDP_PAYLOAD // seg))


def _interleaved(heads: memoryview, body: memoryview, hl: int, mss: int, count: int) -> list[Buf]:
    """heads[0:hl], body[0:mss], heads[hl:2 * hl], body[mss:2 * mss], ...: `count` pairs."""
    iov: list[Buf] = [heads] * (2 * count)
    iov[0::2] = [heads[o : o + hl] for o in range(0, count * hl, hl)]
    iov[1::2] = [body[o : o + mss] for o in range(0, count * mss, mss)]
    return iov


K, V = TypeVar("K"), TypeVar("V")


def kept(cache: dict[K, V], key: K, make: Callable[[], V], limit: int) -> V:
    """cache[key], made by `make` when missing; a full cache is emptied first (few keys are
    live at a time: the buffer layouts for the segments last seen)."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= limit:
            cache.clear()
        value = cache[key] = make()
    return value


class Gather:
    """The sendmsg buffers of `count` datagrams: hl bytes built in `heads` (a segment's
    header, a train chunk's tag), then mss bytes of `payload` (a view of the packet as read);
    `iov` alternates the two, so the kernel gathers each datagram and no Python object is
    made per datagram."""

    def __init__(self, payload: memoryview, hl: int, mss: int, count: int) -> None:
        self.hl, self.mss, self.count = hl, mss, count
        self.heads = bytearray(count * hl)
        self.iov = _interleaved(memoryview(self.heads), payload, hl, mss, count)


LAYOUT_MIN_MSS = 256  # smaller segments (TCP allows 88 bytes) get buffers made per packet


class Gathers:
    """The `Gather` of each (hl, mss) for packets read to the start of `buf` (a few at most,
    for segments of LAYOUT_MIN_MSS bytes and more)."""

    LIMIT = 8

    def __init__(self, buf: bytearray, dgram: int = 0) -> None:
        self.buf = buf
        self._by: dict[tuple[int, int], Gather] = {}
        # trains (`train`) of datagrams of up to `dgram` bytes (0: none); the last train id
        self.dgram, self.train_id, self.trains = dgram, 0, 0

    def get(self, hl: int, mss: int) -> Gather:
        """For segments: headers of hl bytes, payloads after the packet's header."""
        count = -(-(min(len(self.buf), 0xFFFF) - hl) // mss)
        return kept(
            self._by,
            (hl, mss),
            lambda: Gather(memoryview(self.buf)[hl:], hl, mss, count),
            self.LIMIT,
        )

    def train(self, chunk: int) -> Gather:
        """For trains: tags, and chunks of the whole packet (beside the segment layouts,
        under a key no (hl, mss) has)."""
        count = min(MAX_SEGMENTS, len(self.buf) // chunk)
        return kept(
            self._by,
            (-1, chunk),
            lambda: Gather(memoryview(self.buf), TAG_LEN, chunk, count),
            self.LIMIT,
        )


def segment(
    buf: bytearray, start: int, end: int, mss: int, partial: bool, gathers: Gathers | None = None
) -> list[Send] | None:
    """Cut the TCP/IPv4 super-packet buf[start:end] into `mss`-byte segments; the sends (at
    most MAX_SEGMENTS datagrams and MAX_UDP_PAYLOAD bytes each), or None if it is malformed.
    `gathers` holds the buffers for packets read to the start of its buffer.

    With `partial`, each segment's TCP checksum field holds its pseudo-header sum (finished by
    the receiver's kernel); otherwise the full checksum is computed."""
    shape = _shape(buf, start, end - start, mss)
    if shape is None:
        return None
    hl, nseg = shape
    g = None
    if gathers is not None and gathers.buf is buf and start == 0 and mss >= LAYOUT_MIN_MSS:
        g = gathers.get(hl, mss)
    if g is None or g.count < nseg:
        g = Gather(memoryview(buf)[start + hl :], hl, mss, nseg)
    _headers(buf, start, hl, nseg, mss, partial, g.heads)
    iov = g.iov[: 2 * nseg]
    iov[-1] = memoryview(buf)[start + hl + (nseg - 1) * mss : end]
    if not partial:
        ihl = (buf[start] & 0x0F) * 4
        for i in range(0, 2 * nseg, 2):
            _tcp_csum(iov[i], ihl, iov[i], iov[i + 1])
    step = 2 * _per_send(hl + mss)
    return [(iov[i : i + step], hl + mss) for i in range(0, len(iov), step)]


# -- trains: a super-packet in tagged chunks, between peers that both advertise CAP_TRAIN -----
#
# A TCP super-packet cut at the inner MSS repeats its 40-60 header bytes in every datagram: a
# 64 KB one takes 46 datagrams of a 1500-byte MTU, more than one UDP_SEGMENT send carries, so
# every super-packet cost two sends. A train carries the super-packet as read (its one
# header, TTL decremented, TCP checksum partial) cut into equal chunks, each behind a 2-byte
# tag: 0xF0 | the train id's low 4 bits (the high nibble, 15, is no IP version, so no train
# datagram passes for a packet), then the chunk's index (6 bits) | the id's fifth bit << 6 |
# TRAIN_LAST on the train's last chunk.
# 46 datagrams of 1500 bytes carry 65,372 bytes and their tags in one send.
#
# The limit of one send is not the IPv4 one (65,507 bytes of UDP payload): a GSO packet the
# size of a device's gso_max_size (64 KiB, link header included) is cut in software on the
# way, datagram by datagram. MAX_TRAIN_PAYLOAD leaves room for an Ethernet and a VLAN header.

TAG_LEN: Final = 2
TRAIN_MAGIC: Final = 0xF0  # first byte & 0xF0 of every train datagram
TRAIN_LAST: Final = 0x80  # in the index byte
TRAIN_ID_HIGH: Final = 0x40  # in the index byte: the train id's fifth bit
MAX_TRAIN_PAYLOAD: Final = 0x10000 - 28 - 32
_LAST_FLAGS = bytes(1 if b & TRAIN_LAST else 0 for b in range(256))
MIN_TRAIN_MSS = 88  # TCP's smallest MSS (Linux TCP_MIN_MSS): no write cuts finer than that
MIN_TRAIN_CHUNK = 68  # a chunk holds any IPv4 + TCP header; smaller datagrams make no trains
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
        or _shape(buf, 0, n, mss) is None
    ):
        return None
    g = gathers.train(chunk)
    gathers.train_id = ident = (gathers.train_id + 1) & 0x1F
    gathers.trains += 1
    g.heads[: count * TAG_LEN] = train_tags(count, ident)
    iov = g.iov[: 2 * count]
    iov[-1] = memoryview(buf)[(count - 1) * chunk : n]
    return [(iov, dgram)]


def transmit(
    routes: Routes, vnet: Buf, buf: bytearray, n: int, gathers: Gathers | None = None
) -> tuple[Peer, list[Send]] | Reply | Drop:
    """What to do with the packet buf[:n] read from the TUN after the virtio-net header
    `vnet`: the peer and the sends, an ICMP reply, or a drop. `gathers`: see `segment`."""
    decision = routes.egress(buf, 0, n)
    if not isinstance(decision, Peer):
        return decision
    peer = decision
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET.unpack_from(vnet)
    if gso_type == GSO_TCPV4:
        sends = None
        if peer.train and gathers is not None and gathers.dgram:
            sends = train(buf, n, gso_size, gathers)
        if sends is None:
            sends = segment(buf, 0, n, gso_size, peer.partial_csum, gathers)
        return (peer, sends) if sends is not None else Drop.BAD_OFFLOAD
    if gso_type != GSO_NONE:
        return Drop.BAD_OFFLOAD
    if flags & F_NEEDS_CSUM:
        ihl = (buf[0] & 0x0F) * 4
        field = _CSUM_FIELD.get(buf[9], (-1, 0))[0]
        standard = csum_start == ihl and csum_offset == field and not _is_fragment(buf, 0)
        if not (peer.partial_csum and standard) and not finish_csum(
            buf, csum_start, csum_start + csum_offset, n
        ):
            return Drop.BAD_OFFLOAD
    return peer, [([memoryview(buf)[:n]], n)]


def _single(buf: bytearray, off: int, end: int, partial: bool) -> list[Buf]:
    """The write of one accepted packet: TTL decremented; from a capable peer, a TCP/UDP
    checksum declared partial (the field reset to the pseudo-header sum)."""
    decrement_ttl(buf, off)
    vnet = PLAIN
    if partial and not (buf[off + 6] & 0x3F or buf[off + 7]):  # not a fragment
        ihl = (buf[off] & 0x0F) * 4
        proto = buf[off + 9]
        field, minimum = _CSUM_FIELD.get(proto, (0, 0xFFFF))
        length = end - off - ihl
        if length >= minimum:
            _U16.pack_into(
                buf, off + ihl + field, pseudo_sum(buf[off + 12 : off + 20], proto, length)
            )
            vnet = VNET.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, field)
    return [vnet, memoryview(buf)[off:end]]


class Run:
    """Consecutive in-order segments of one TCP stream, to be written as one super-packet."""

    __slots__ = ("buf", "off", "partial", "ref", "head", "tail", "t", "hl", "mss", "dlen")
    __slots__ += ("seq", "total", "parts", "psh", "done")

    def __init__(self, buf: bytearray, off: int, end: int, t: int, hl: int, partial: bool) -> None:
        self.buf, self.off, self.partial, self.t, self.hl = buf, off, partial, t, hl
        self.ref = bytes(buf[off : off + hl])
        self.head, self.tail = self.ref[: t + 4], self.ref[t + 8 :]  # around the seq number
        self.dlen = self.total = end - off
        self.mss = self.dlen - hl
        self.seq = (_U32.unpack_from(buf, off + t + 4)[0] + self.mss) & 0xFFFFFFFF
        self.parts: list[Buf] = [memoryview(buf)[off + hl : end]]
        self.psh = self.done = False

    @classmethod
    def begin(cls, buf: bytearray, off: int, end: int, partial: bool) -> Run | None:
        """A run starting with this accepted packet, if it is a plain in-order data segment
        from a peer that leaves its checksums partial: a join is written with NEEDS_CSUM, so
        the kernel computes a fresh TCP checksum and never verifies the segments' own."""
        t = (buf[off] & 0x0F) * 4
        if (
            not partial  # complete checksums: each packet written as it came, for the kernel
            or end - off <= t + 20  # no room for a payload (an ACK, say)
            or buf[off + 9] != IPPROTO_TCP
            or buf[off + 6] & 0x3F  # MF or a fragment offset
            or buf[off + 7]
            or buf[off + t + 13] != ACK
        ):
            return None
        hl = t + (buf[off + t + 12] >> 4) * 4
        return cls(buf, off, end, t, hl, partial) if t + 20 <= hl < end - off else None

    def _add(self, buf: bytearray, off: int, end: int) -> bool:
        size = end - off - self.hl
        if self.total + size > 0xFFFF:
            return False
        self.parts.append(memoryview(buf)[off + self.hl : end])
        self.total += size
        self.seq = (self.seq + size) & 0xFFFFFFFF
        return True

    def extend_same(self, buf: bytearray, off: int, end: int) -> bool:
        """Take a full-size segment whose header equals the first one's but for the sequence
        number, which must follow on; no validation needed (see the module doc)."""
        t = self.t
        return (
            not self.done
            and end - off == self.dlen
            and buf[off : off + t + 4] == self.head
            and _U32.unpack_from(buf, off + t + 4)[0] == self.seq
            and buf[off + t + 8 : off + self.hl] == self.tail
            and self._add(buf, off, end)
        )

    def extend_train(self, buf: bytearray, off: int, n: int) -> int:
        """`extend_same` at C speed for the full-size datagrams from `off` on (but a last one
        that ends the buffer: it may carry PSH), compared column by column as 32-bit words;
        all or nothing. The offset after what was taken."""
        seg, mss = self.dlen, self.mss
        m = (n - off) // seg - (1 if (n - off) % seg == 0 else 0)
        if m < 2 or seg % 4 or self.done or self.total + m * mss > 0xFFFF:
            return off
        words = memoryview(buf)[: n - n % 4].cast("I")
        first, stop, stride, seq_word = off // 4, (off + m * seg) // 4, seg // 4, (self.t + 4) // 4
        ref = self.ref
        for w in range(self.hl // 4):
            column = words[first + w : stop : stride].tobytes()
            if w != seq_word and column != ref[4 * w : 4 * w + 4] * m:
                return off
        if (
            words[first + seq_word : stop : stride].tobytes()
            != _progression(self.seq, mss, m).tobytes()
        ):
            return off
        mv = memoryview(buf)
        self.parts += [mv[o + self.hl : o + seg] for o in range(off, off + m * seg, seg)]
        self.total += m * mss
        self.seq = (self.seq + m * mss) & 0xFFFFFFFF
        return off + m * seg

    def extend_heads(self, sc: Scatter, i: int, j: int) -> int:
        """`extend_same` for the full-size datagrams i..j-1 of a scattered receive (as many as
        fit in one super-packet): their headers, back to back in `sc.heads`, must equal the
        first one's but for the sequence numbers, which must follow on; one comparison for
        the whole train, all or nothing. The index after what was taken."""
        hl, mss = self.hl, self.mss
        if self.done or hl != sc.hl or self.dlen != sc.seg:
            return i
        j = min(j, i + (0xFFFF - self.total) // mss)
        count = j - i
        if count <= 0:
            return i
        want = bytearray(self.ref) * count
        _column(want, (self.t + 4) // 4, hl // 4, _progression(self.seq, mss, count))
        if sc.heads[i * hl : j * hl] != want:
            return i
        self.parts.append(sc.body_view[i * mss : j * mss])
        self.total += count * mss
        self.seq = (self.seq + count * mss) & 0xFFFFFFFF
        return j

    def extend(self, buf: bytearray, off: int, end: int) -> bool:
        """Take a validated segment of the same stream that differs in its IP ID, length,
        checksums or PSH (the last one of a burst); it ends the run if short or pushed."""
        r, t, hl = self.ref, self.t, self.hl
        size = end - off - hl
        if self.done or not 0 < size <= self.mss:  # first: a shorter packet has no TCP flags
            return False
        flags = buf[off + t + 13]
        if (
            flags & ~PSH != ACK
            or buf[off] != r[0]
            or buf[off + 1] != r[1]
            or buf[off + 6 : off + 10] != r[6:10]
            or buf[off + 12 : off + t + 4] != r[12 : t + 4]
            or _U32.unpack_from(buf, off + t + 4)[0] != self.seq
            or buf[off + t + 8 : off + t + 13] != r[t + 8 : t + 13]
            or buf[off + t + 14 : off + t + 16] != r[t + 14 : t + 16]
            or buf[off + t + 20 : off + hl] != r[t + 20 :]
            or not self._add(buf, off, end)
        ):
            return False
        self.psh = bool(flags & PSH)
        self.done = self.psh or size < self.mss
        return True

    def write(self) -> list[Buf]:
        """The TUN write of the run: one super-packet (GSO_TCPV4), or its only packet."""
        if len(self.parts) == 1:
            return _single(self.buf, self.off, self.off + self.dlen, self.partial)
        h, t = bytearray(self.ref), self.t
        _U16.pack_into(h, 2, self.total)
        h[8] -= 1  # TTL, validated > 1
        _ip_csum(h, 0, t)
        if self.psh:
            h[t + 13] |= PSH
        _U16.pack_into(h, t + 16, pseudo_sum(h[12:20], IPPROTO_TCP, self.total - t))
        vnet = VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, self.hl, self.mss, t, 16)
        return [vnet, h, *self.parts]


def receive(
    routes: Routes,
    ip: str,
    port: int,
    buf: bytearray,
    n: int,
    seg: int,
    drops: Counter[Drop],
    run: Run | None = None,
) -> tuple[list[list[Buf]], Run | None]:
    """The TUN writes (writev buffer lists, each led by a virtio-net header) for buf[:n], the
    datagrams of one receive from (ip, port), each `seg` bytes but the last; refused ones are
    counted in `drops`.

    `run` is the open run the previous receive from the same sender returned: it may go on
    here (a super-packet cut into two UDP_SEGMENT sends becomes one write again). The run
    still open at the end (its last segment full-size, no PSH) is returned unwritten: the
    caller continues it with the next receive or writes it (`Run.write`)."""
    if n <= 0 or seg <= 0:  # an empty datagram (it carries no GRO size either)
        drops[Drop.SHORT] += 1
        return ([run.write()] if run else []), None
    peer = routes.sender(ip, port)
    if isinstance(peer, Drop):
        drops[peer] += -(-n // seg)
        return ([run.write()] if run else []), None
    partial = peer.partial_csum
    if run is None and n <= seg:  # one datagram and nothing to continue: the common ACK
        reason = routes.check(ip, buf, 0, n)
        if reason is not None:
            drops[reason] += 1
            return [], None
        run = Run.begin(buf, 0, n, partial)
        if run is None:
            return [_single(buf, 0, n, partial)], None
        return [], run  # a data segment: the next receive may continue it
    writes: list[list[Buf]] = []
    off = 0
    if run is not None and run.extend_same(buf, 0, min(seg, n)):
        off = run.extend_train(buf, min(seg, n), n)
    while off < n:
        end = min(off + seg, n)
        if run is not None and run.extend_same(buf, off, end):
            off = end
            continue
        reason = routes.check(ip, buf, off, end)
        if reason is not None:
            drops[reason] += 1
            off = end
            continue
        if run is not None:
            if run.extend(buf, off, end):
                off = end
                continue
            writes.append(run.write())
        run = Run.begin(buf, off, end, partial)
        if run is None:
            writes.append(_single(buf, off, end, partial))
            off = end
        else:
            off = run.extend_train(buf, end, n)
    if run is not None and run.done:
        writes.append(run.write())
        run = None
    return writes, run


class Scatter:
    """Receive buffers laid out for trains of (hl + mss)-byte datagrams: recvmsg_into(`iov`)
    puts the first hl bytes of datagram i at heads[i * hl] and the rest at body[i * mss], so
    the headers of a train can be compared in one go and its payloads lie back to back, ready
    to be written as one piece. `overflow` catches what does not fit (64 KB and more)."""

    def __init__(self, hl: int, mss: int, size: int = 0x10000) -> None:
        self.hl, self.mss, self.seg = hl, mss, hl + mss
        count = -(-size // self.seg)
        self.heads, self.body = bytearray(count * hl), bytearray(count * mss)
        self.body_view = memoryview(self.body)
        self.iov = _interleaved(memoryview(self.heads), self.body_view, hl, mss, count)
        self.overflow = bytearray(size)
        self.iov.append(self.overflow)
        self.capacity = count * self.seg

    def load(self, data: Buf) -> None:
        """Put `data` (a receive as it came) where a receive into `iov` would have."""
        off = 0
        for part in self.iov:
            size = min(len(part), len(data) - off)
            if size <= 0:
                break
            part[:size] = data[off : off + size]
            off += size

    def flat(self, start: int, end: int) -> bytearray:
        """A copy of bytes start..end of what the receive delivered (start a datagram's)."""
        hl, seg, heads, body = self.hl, self.seg, self.heads, self.body
        out = bytearray()
        for o in range(start, min(end, self.capacity), seg):
            i, size = o // seg, min(seg, end - o)
            out += heads[i * hl : i * hl + min(hl, size)]
            if size > hl:
                out += body[i * self.mss : i * self.mss + size - hl]
        if end > self.capacity:
            out += self.overflow[: end - self.capacity]
        return out


def receive_scattered(
    routes: Routes,
    ip: str,
    port: int,
    sc: Scatter,
    n: int,
    seg: int,
    drops: Counter[Drop],
    run: Run | None = None,
) -> tuple[list[list[Buf]], Run | None]:
    """`receive` for the n bytes a receive into `sc.iov` delivered: the same writes, but a
    train of segments that continue a run (its first segment validated) is taken with one
    comparison of its headers and written from `sc.body` in one piece; every other datagram
    goes through `receive` on a copy."""
    if seg != sc.seg or n < seg:  # not datagrams of the layout's size (also: an empty one)
        return receive(routes, ip, port, sc.flat(0, n), n, seg, drops, run)
    peer = routes.sender(ip, port)
    if isinstance(peer, Drop):
        drops[peer] += -(-n // seg)
        return ([run.write()] if run else []), None
    writes: list[list[Buf]] = []
    i = 0
    if run is None:
        writes, run = receive(routes, ip, port, sc.flat(0, seg), seg, seg, drops)
        i = 1
    if run is not None:
        # the full-size datagrams at once; the last of them too unless it carries PSH (its
        # header differs: it goes through `receive`, as does a shorter last datagram)
        full = n // seg
        if full > i and (sc.hl != run.hl or sc.heads[(full - 1) * sc.hl + run.t + 13] != ACK):
            full -= 1
        i = run.extend_heads(sc, i, full)
    if i * seg >= n:
        return writes, run
    more, run = receive(routes, ip, port, sc.flat(i * seg, n), n - i * seg, seg, drops, run)
    return writes + more, run


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
    (README, udp options). A whole train must be
    one valid TCP/IPv4 packet from the sender's subnet to ours (`Routes.check`), from a peer
    that advertised CAP_TRAIN; it is written cut at `mtu` (this node's TUN MTU, the inner
    MTU of every node) less its headers."""

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
        how many datagrams were train datagrams: the caller passes the rest on."""
        d = -(-n // seg) if seg > 0 else 0
        peer = routes.sender(ip, port)
        if isinstance(peer, Drop) or not (peer.train and peer.partial_csum):
            drops[Drop.BAD_TRAIN if isinstance(peer, Peer) else peer] += d
            return [], d
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
    ihl = (pkt[0] & 0x0F) * 4
    hl = ihl + (pkt[ihl + 12] >> 4) * 4 if n >= ihl + 20 else 0
    if (
        pkt[9] != IPPROTO_TCP
        or pkt[6] & 0x3F  # MF or a fragment offset
        or pkt[7]
        or not ihl + 20 <= hl < n
        or mtu - hl < MIN_TRAIN_MSS
    ):
        drops[Drop.BAD_TRAIN] += 1
        return None
    decrement_ttl(pkt, 0)
    _U16.pack_into(pkt, ihl + 16, pseudo_sum(pkt[12:20], IPPROTO_TCP, n - ihl))
    return [VNET.pack(F_NEEDS_CSUM, GSO_TCPV4, hl, mtu - hl, ihl, 16), pkt]
