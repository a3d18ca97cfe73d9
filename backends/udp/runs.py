"""GRO runs, without I/O: the datagrams of one UDP_GRO receive validated and consecutive
segments of one TCP stream joined back into a super-packet, one TUN write for many datagrams.

Theory of operation. `receive` takes the datagrams of one receive in one flat buffer,
validates each (`Routes.check`), and joins consecutive segments of one TCP stream into a `Run`
written with GSO_TCPV4, so the receiving kernel handles 64 KB per write as the sending one
did. A run still open at the end of a receive (its last segment full-size, no PSH) is handed
back: the next receive may continue it, where the sender's second `sendmsg` of the same
super-packet lands. A segment whose header bytes equal those of the already-validated first
one but for the sequence number, which must follow on, is accepted without re-validation
(same bytes, same length, same sender, same verdict); whole trains of them are compared at
once, 32-bit column by column in a flat buffer (`Run.extend_train`). `receive_scattered` takes
a receive into a `layouts.Scatter` instead, which puts the headers back to back and the
payloads back to back, so a train is one comparison of its headers and one piece of payload
to write (`Run.extend_heads`). Between capable peers the TCP/UDP checksum of what is written
is declared partial: the outer UDP checksum has covered the bytes in transit.

Only segments from a peer that advertised `CAP_PARTIAL_CSUM` are joined: the kernel computes
a fresh TCP checksum for a join, which would make good a segment corrupted on its way from a
peer whose datagrams carry complete checksums (the reference). That peer's packets are
written one by one as they came, without NEEDS_CSUM, so the kernel verifies each one;
measured in the lab, that takes less of the agent's CPU than joining them did, and less
than verifying their checksums here in order to join them.
"""

from __future__ import annotations

from collections import Counter

from .core import Drop, Routes
from .ipv4 import (
    ACK,
    CSUM_FIELD,
    IP_HL,
    IPPROTO_TCP,
    PSH,
    TCP_HL,
    U16,
    U32,
    Buf,
    column,
    decrement_ttl,
    ip_csum,
    is_fragment,
    progression,
    pseudo_sum,
)
from .layouts import Scatter
from .vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, PLAIN, VNET

Writes = list[list[Buf]]  # TUN writes: writev buffer lists, each led by a virtio-net header


def single(buf: bytearray, off: int, end: int, partial: bool) -> list[Buf]:
    """The write of one accepted packet: TTL decremented; with `partial` (a capable peer's
    packet, not a fragment), a TCP/UDP checksum declared partial (the field reset to the
    pseudo-header sum)."""
    decrement_ttl(buf, off)
    vnet = PLAIN
    if partial:
        ihl = IP_HL[buf[off]]
        proto = buf[off + 9]
        field, minimum = CSUM_FIELD.get(proto, (0, 0xFFFF))
        length = end - off - ihl
        if length >= minimum:
            U16.pack_into(
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
        self.seq = (U32.unpack_from(buf, off + t + 4)[0] + self.mss) & 0xFFFFFFFF
        self.parts: list[Buf] = [memoryview(buf)[off + hl : end]]
        self.psh = self.done = False

    @classmethod
    def begin(cls, buf: bytearray, off: int, end: int, partial: bool) -> Run | None:
        """A run starting with this accepted packet, if it is a plain in-order data segment
        from a peer that leaves its checksums partial: a join is written with NEEDS_CSUM, so
        the kernel computes a fresh TCP checksum and never verifies the segments' own."""
        t = IP_HL[buf[off]]
        if (
            not partial  # complete checksums: each packet written as it came, for the kernel
            or end - off <= t + 20  # no room for a payload (an ACK, say)
            or buf[off + 9] != IPPROTO_TCP
            or buf[off + t + 13] != ACK
        ):
            return None
        hl = t + TCP_HL[buf[off + t + 12]]
        if not t + 20 <= hl < end - off or is_fragment(buf, off):
            return None
        return cls(buf, off, end, t, hl, partial)

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
            and U32.unpack_from(buf, off + t + 4)[0] == self.seq
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
            col = words[first + w : stop : stride].tobytes()
            if w != seq_word and col != ref[4 * w : 4 * w + 4] * m:
                return off
        if (
            words[first + seq_word : stop : stride].tobytes()
            != progression(self.seq, mss, m).tobytes()
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
        column(want, (self.t + 4) // 4, hl // 4, progression(self.seq, mss, count))
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
            or U32.unpack_from(buf, off + t + 4)[0] != self.seq
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
        if len(self.parts) == 1:  # `begin` took no fragment
            return single(self.buf, self.off, self.off + self.dlen, self.partial)
        h, t = bytearray(self.ref), self.t
        U16.pack_into(h, 2, self.total)
        h[8] -= 1  # TTL, validated > 1
        ip_csum(h, 0, t)
        if self.psh:
            h[t + 13] |= PSH
        U16.pack_into(h, t + 16, pseudo_sum(h[12:20], IPPROTO_TCP, self.total - t))
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
) -> tuple[Writes, Run | None]:
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
            return [single(buf, 0, n, partial and not is_fragment(buf, 0))], None
        return [], run  # a data segment: the next receive may continue it
    writes: Writes = []
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
            writes.append(single(buf, off, end, partial and not is_fragment(buf, off)))
            off = end
        else:
            off = run.extend_train(buf, end, n)
    if run is not None and run.done:
        writes.append(run.write())
        run = None
    return writes, run


def receive_scattered(
    routes: Routes,
    ip: str,
    port: int,
    sc: Scatter,
    n: int,
    seg: int,
    drops: Counter[Drop],
    run: Run | None = None,
) -> tuple[Writes, Run | None]:
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
    writes: Writes = []
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
