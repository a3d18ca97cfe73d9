"""Buffer layouts for the UDP socket, without I/O: the gather lists of a super-packet's sends
(`Gather`, kept per shape by `Gathers`) and the scatter lists of a receive (`Scatter`).

Theory of operation. A send of n datagrams is one `sendmsg` with UDP_SEGMENT over a list that
alternates a small head built apart (a segment's header, a train chunk's tag) and a view of the
payload as read from the TUN, so the kernel gathers each datagram and no Python object is made
per datagram. A receive of a GRO batch into a `Scatter` is the other way round: the first hl
bytes of each datagram land in `heads`, back to back, and the rest in `body`, back to back, so
the headers of a train are compared in one go and its payloads are one piece to write. Both
lists are made once per shape and kept (a few shapes are live at a time: `kept`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeVar

from .ipv4 import Buf

Send = tuple[list[Buf], int]  # the buffers of one sendmsg and its UDP_SEGMENT size

MAX_UDP_PAYLOAD: Final = 0xFFFF - 28  # one UDP_SEGMENT send (IPv4 total length limit)
MAX_SEGMENTS: Final = 64  # UDP_MAX_SEGMENTS of older kernels (newer ones allow 128)
LAYOUT_MIN_MSS: Final = 256  # smaller segments (TCP allows 88 bytes) get buffers made per packet
KEPT: Final = 8  # layouts kept per cache

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


def per_send(seg: int) -> int:
    """How many `seg`-byte datagrams one UDP_SEGMENT send carries."""
    return max(1, min(MAX_SEGMENTS, MAX_UDP_PAYLOAD // seg))


def interleaved(heads: memoryview, body: memoryview, hl: int, mss: int, count: int) -> list[Buf]:
    """heads[0:hl], body[0:mss], heads[hl:2 * hl], body[mss:2 * mss], ...: `count` pairs."""
    iov: list[Buf] = [heads] * (2 * count)
    iov[0::2] = [heads[o : o + hl] for o in range(0, count * hl, hl)]
    iov[1::2] = [body[o : o + mss] for o in range(0, count * mss, mss)]
    return iov


class Gather:
    """The sendmsg buffers of `count` datagrams: hl bytes built in `heads` (a segment's
    header, a train chunk's tag), then mss bytes of `payload` (a view of the packet as read);
    `iov` alternates the two, so the kernel gathers each datagram and no Python object is
    made per datagram."""

    def __init__(self, payload: memoryview, hl: int, mss: int, count: int) -> None:
        self.hl, self.mss, self.count = hl, mss, count
        self.heads = bytearray(count * hl)
        self.iov = interleaved(memoryview(self.heads), payload, hl, mss, count)


class Gathers:
    """The `Gather` of each (hl, mss) for packets read to the start of `buf` (a few at most,
    for segments of LAYOUT_MIN_MSS bytes and more); and the sender's side of trains
    (`trains.train`): their datagram size `dgram` (0: no trains), the last train id, how many
    were sent."""

    LIMIT = KEPT

    def __init__(self, buf: bytearray, dgram: int = 0) -> None:
        self.buf = buf
        self._by: dict[tuple[int, int], Gather] = {}
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

    def whole(self, hl: int, chunk: int) -> Gather:
        """For trains: hl-byte tags, and chunks of the whole packet (beside the segment
        layouts, under a key no (hl, mss) has)."""
        count = min(MAX_SEGMENTS, len(self.buf) // chunk)
        return kept(
            self._by,
            (-hl, chunk),
            lambda: Gather(memoryview(self.buf), hl, chunk, count),
            self.LIMIT,
        )


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
        self.iov = interleaved(memoryview(self.heads), self.body_view, hl, mss, count)
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
