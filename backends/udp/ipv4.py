"""IPv4 and TCP header arithmetic, shared by every udp module: header lengths, fragments,
checksums and their incremental updates, columns of sequence numbers.

Lengths are lookup tables, not functions: `IP_HL[buf[off]]` is the header length of the IPv4
packet at `off`, `TCP_HL[buf[off + ihl + 12]]` that of its TCP header, at the cost of one
subscript wherever a packet is looked at. Checksums use the identity "one's-complement sum of
16-bit words == the big-endian integer mod 0xFFFF", which lets `int.from_bytes` do the
arithmetic at C speed. A column stores one 32-bit value per header of headers laid back to back
(`column`, `progression`), so the sequence numbers of a whole train of segments are written or
compared in one go.
"""

from __future__ import annotations

import struct
import sys
from array import array
from typing import Final

Buf = bytes | bytearray | memoryview

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80  # TCP flags

# tuples: the interpreter indexes a tuple faster than it computes (b & 0x0F) * 4
IP_HL: Final = tuple((b & 0x0F) * 4 for b in range(256))  # by the first byte: IHL in bytes
TCP_HL: Final = tuple((b >> 4) * 4 for b in range(256))  # by byte 12 of TCP: data offset

U16, U32 = struct.Struct("!H"), struct.Struct("!I")
CSUM_FIELD: Final = {IPPROTO_TCP: (16, 20), IPPROTO_UDP: (6, 8)}  # proto: (offset, min length)
_LITTLE = sys.byteorder == "little"


def is_fragment(buf: Buf, off: int) -> bool:
    """The IPv4 packet at `off` is a fragment: MF set or a fragment offset."""
    return bool((buf[off + 6] << 8 | buf[off + 7]) & 0x3FFF)


def is_later_fragment(buf: Buf, off: int) -> bool:
    """The IPv4 packet at `off` is a fragment other than the first (a fragment offset)."""
    return bool((buf[off + 6] << 8 | buf[off + 7]) & 0x1FFF)


# -- checksums ----------------------------------------------------------------------------------


def ones_sum(data: Buf) -> int:
    """The one's-complement sum of `data` as 16-bit big-endian words, reduced mod 0xFFFF."""
    value = int.from_bytes(data, "big")
    return (value << 8 if len(data) & 1 else value) % 0xFFFF


def checksum(data: Buf, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of `data`, plus a partial sum `initial` (a pseudo
    header); 0 stands for the "negative zero" 0xFFFF, which receivers treat alike."""
    return -(ones_sum(data) + initial) % 0xFFFF


def pseudo_sum(src: Buf, proto: int, length: int) -> int:
    """The partial sum of the TCP/UDP pseudo header; `src` holds source and destination (8
    bytes). Stored in the checksum field, it is what a kernel finishes (CHECKSUM_PARTIAL)."""
    return (ones_sum(src) + proto + length) % 0xFFFF or 0xFFFF


def header_ok(buf: Buf, off: int, ihl: int) -> bool:
    """The IPv4 header at `off` has a valid checksum (its words sum to negative zero)."""
    return int.from_bytes(buf[off : off + ihl], "big") % 0xFFFF == 0


def ip_csum(h: bytearray, off: int, ihl: int) -> None:
    """Recompute the checksum of the IPv4 header at `off`."""
    h[off + 10 : off + 12] = b"\0\0"
    U16.pack_into(h, off + 10, checksum(h[off : off + ihl]))


def finish_csum(buf: bytearray, start: int, field: int, end: int) -> bool:
    """Complete a partial checksum: sum buf[start:end] (the field holds the pseudo-header
    sum) into buf[field:field+2]. False when the offsets fall outside the packet."""
    if not start < end or not start <= field <= end - 2:
        return False
    U16.pack_into(buf, field, checksum(buf[start:end]) or 0xFFFF)
    return True


def decrement_ttl(buf: bytearray | memoryview, off: int) -> None:
    """TTL -= 1 on the IPv4 header at `off`, patching its checksum incrementally
    (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), m the TTL/protocol word). TTL must be >= 1:
    then m' = m - 0x100 and ~m + m' is 0xFEFF whatever m, so one addition and one fold do."""
    s = (~(buf[off + 10] << 8 | buf[off + 11]) & 0xFFFF) + 0xFEFF
    hc = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    buf[off + 8] -= 1
    buf[off + 10] = hc >> 8
    buf[off + 11] = hc & 0xFF


def set_length(h: bytearray, off: int, length: int) -> None:
    """Set the total length of the IPv4 header at `off` and patch its checksum (RFC 1624
    eqn. 3: HC' = ~(~HC + ~m + m'))."""
    old = h[off + 2] << 8 | h[off + 3]
    s = (~(h[off + 10] << 8 | h[off + 11]) & 0xFFFF) + (~old & 0xFFFF) + length
    s = (s & 0xFFFF) + (s >> 16)
    s = ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF
    h[off + 2], h[off + 3], h[off + 10], h[off + 11] = length >> 8, length & 0xFF, s >> 8, s & 0xFF


# -- columns: one 32-bit word per header of headers laid back to back ------------------------

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


def progression(first: int, step: int, count: int) -> memoryview:
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


def column(buf: bytearray, word: int, stride: int, values: memoryview) -> None:
    """Store `values` at 32-bit word `word`, `word + stride`, ... of `buf` (at C speed)."""
    memoryview(buf).cast("I")[word::stride][: len(values)] = values
