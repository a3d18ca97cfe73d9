"""The egress decision for one TUN read that carries a virtio-net header: the peer and the
sends (a train, segments, or the packet as it is), an ICMP reply, or a drop.

A TCP super-packet (GSO_TCPV4) goes to a peer that advertised CAP_TRAIN as one train
(`trains.train`) when it fits one send, else cut into segments (`tso.segment`). A single
packet whose checksum the kernel left partial (F_NEEDS_CSUM) keeps it partial for a peer that
advertised CAP_PARTIAL_CSUM (when the kernel's offsets are the standard ones of an unfragmented
TCP or UDP packet); any other peer, such as the reference flanneld, gets it finished here.
"""

from __future__ import annotations

from .core import Drop, Peer, Reply, Routes
from .ipv4 import CSUM_FIELD, IP_HL, Buf, finish_csum, is_fragment
from .layouts import Gathers, Send
from .trains import train
from .tso import segment
from .vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, VNET


def transmit(
    routes: Routes, vnet: Buf, buf: bytearray, n: int, gathers: Gathers | None = None
) -> tuple[Peer, list[Send]] | Reply | Drop:
    """What to do with the packet buf[:n] read from the TUN after the virtio-net header
    `vnet`: the peer and the sends, an ICMP reply, or a drop. `gathers`: see `tso.segment`."""
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
        ihl = IP_HL[buf[0]]
        field = CSUM_FIELD.get(buf[9], (-1, 0))[0]
        standard = csum_start == ihl and csum_offset == field and not is_fragment(buf, 0)
        if not (peer.partial_csum and standard) and not finish_csum(
            buf, csum_start, csum_start + csum_offset, n
        ):
            return Drop.BAD_OFFLOAD
    return peer, [([memoryview(buf)[:n]], n)]
