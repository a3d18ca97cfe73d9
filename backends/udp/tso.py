"""TCP segmentation, without I/O: a TCP super-packet read from the TUN cut into inner packets
of the container MTU, as the kernel's TSO would cut it, into the buffers of its sends.

Theory of operation. The TUN hands over a TCP super-packet of up to 64 KB whose checksum is
left partial. `segment` cuts it at `gso_size` following the kernel's TSO rules: sequence
numbers advance by the MSS; CWR only on the first segment, FIN and PSH only on the last; a DF
packet keeps one IP ID (RFC 6864), any other counts up. The headers of all segments are built
at once in the heads of a `layouts.Gather` (the first segment's header repeated, then the
columns that differ: sequence numbers, the last segment's length and flags), so one `sendmsg`
with UDP_SEGMENT sends up to MAX_SEGMENTS of them as equal-sized datagrams, each one inner IPv4
packet, with no Python object made per segment. A peer that advertised `CAP_PARTIAL_CSUM` gets
TCP checksums unfinished (its kernel finishes or skips them); any other peer, such as the
reference flanneld, gets them computed here.
"""

from __future__ import annotations

from .ipv4 import (
    CWR,
    FIN,
    IP_HL,
    IPPROTO_TCP,
    PSH,
    TCP_HL,
    U16,
    U32,
    Buf,
    column,
    ip_csum,
    ones_sum,
    progression,
    set_length,
)
from .layouts import LAYOUT_MIN_MSS, Gather, Gathers, Send, per_send


def shape(buf: bytearray, start: int, length: int, mss: int) -> tuple[int, int] | None:
    """(header length, segment count) of the TCP/IPv4 super-packet of `length` bytes at
    `start` (only its header is read) to be cut into mss-byte segments; None if malformed."""
    ihl = IP_HL[buf[start]]
    if buf[start + 9] != IPPROTO_TCP or mss <= 0 or length < ihl + 20:
        return None
    thl = TCP_HL[buf[start + ihl + 12]]
    hl = ihl + thl
    paylen = length - hl
    if thl < 20 or paylen <= 0 or U16.unpack_from(buf, start + 2)[0] != length:
        return None
    return hl, -(-paylen // mss)


def _headers(
    buf: bytearray, start: int, hl: int, nseg: int, mss: int, partial: bool, out: bytearray
) -> None:
    """Write the nseg headers (hl bytes each, back to back) of the segments of the TCP/IPv4
    super-packet whose header is buf[start:start+hl] to the start of `out`, as the kernel's
    TSO would write them."""
    ihl = t = IP_HL[buf[start]]
    thl = hl - ihl
    flags = buf[start + t + 13]
    seq0 = U32.unpack_from(buf, start + t + 4)[0]
    ident = U16.unpack_from(buf, start + 4)[0]
    fixed_id = buf[start + 6] & 0x40  # DF: the ID has no meaning (RFC 6864), keep one
    total = U16.unpack_from(buf, start + 2)[0]
    pseudo = ones_sum(buf[start + 12 : start + 20]) + IPPROTO_TCP
    tail = total - hl - (nseg - 1) * mss  # the last segment's payload (IP length as read)

    tmpl = bytearray(buf[start : start + hl])
    set_length(tmpl, 0, hl + mss)  # the header as read has a valid checksum: patch it
    tmpl[t + 13] = flags & ~(FIN | PSH | CWR)
    U16.pack_into(tmpl, t + 16, ((pseudo + thl + mss) % 0xFFFF or 0xFFFF) if partial else 0)
    hdrs = out
    hdrs[: nseg * hl] = tmpl * nseg
    if nseg > 1:
        column(hdrs, (t + 4) // 4, hl // 4, progression(seq0, mss, nseg))
    if not fixed_id:
        for i in range(1, nseg):
            U16.pack_into(hdrs, i * hl + 4, (ident + i) & 0xFFFF)
            ip_csum(hdrs, i * hl, ihl)
    last = (nseg - 1) * hl
    if nseg > 1:
        hdrs[t + 13] = flags & ~(FIN | PSH)
        hdrs[last + t + 13] = flags & ~CWR
    else:
        hdrs[t + 13] = flags
    set_length(hdrs, last, hl + tail)
    if partial:
        U16.pack_into(hdrs, last + t + 16, (pseudo + thl + tail) % 0xFFFF or 0xFFFF)


def _tcp_csum(buf: Buf, ihl: int, header: Buf, payload: Buf) -> None:
    """Fill in the full TCP checksum of one segment (its checksum field reads 0)."""
    pseudo = ones_sum(header[12:20]) + IPPROTO_TCP + len(header) - ihl + len(payload)
    s = pseudo + ones_sum(header[ihl:]) + ones_sum(payload)
    U16.pack_into(buf, ihl + 16, -s % 0xFFFF or 0xFFFF)


def segment(
    buf: bytearray, start: int, end: int, mss: int, partial: bool, gathers: Gathers | None = None
) -> list[Send] | None:
    """Cut the TCP/IPv4 super-packet buf[start:end] into `mss`-byte segments; the sends (at
    most MAX_SEGMENTS datagrams and MAX_UDP_PAYLOAD bytes each), or None if it is malformed.
    `gathers` holds the buffers for packets read to the start of its buffer.

    With `partial`, each segment's TCP checksum field holds its pseudo-header sum (finished by
    the receiver's kernel); otherwise the full checksum is computed."""
    dims = shape(buf, start, end - start, mss)
    if dims is None:
        return None
    hl, nseg = dims
    g = None
    if gathers is not None and gathers.buf is buf and start == 0 and mss >= LAYOUT_MIN_MSS:
        g = gathers.get(hl, mss)
    if g is None or g.count < nseg:
        g = Gather(memoryview(buf)[start + hl :], hl, mss, nseg)
    _headers(buf, start, hl, nseg, mss, partial, g.heads)
    iov = g.iov[: 2 * nseg]
    iov[-1] = memoryview(buf)[start + hl + (nseg - 1) * mss : end]
    if not partial:
        ihl = IP_HL[buf[start]]
        for i in range(0, 2 * nseg, 2):
            _tcp_csum(iov[i], ihl, iov[i], iov[i + 1])
    step = 2 * per_send(hl + mss)
    return [(iov[i : i + step], hl + mss) for i in range(0, len(iov), step)]
