"""The udp backend's routing and admission decisions, without I/O: bytes in, decision out.

Theory of operation. `Routes` is an immutable snapshot of everything the datapath needs to
decide about one packet: the cluster network, this node's subnet (and so the TUN address), the
backend Port, and the peers. The agent builds a new snapshot on every peer change and hands it
to the datapath thread by one reference assignment; a packet is always judged against one
consistent snapshot.

- Egress (a packet read from the TUN): `Routes.egress` finds the peer whose subnet holds the
  destination (a dict lookup on `dst & mask` for the network's SubnetLen, longest prefix for
  subnets of any other size) and decrements the TTL; a destination inside the network that no
  peer holds is answered with an ICMP net-unreachable written back to the TUN (never about an
  ICMP error or a non-first fragment), as the reference does.
- Ingress (a UDP datagram): `Routes.sender` admits only a known peer's PublicIP sending from
  the configured Port; `Routes.check` then demands one well-formed IPv4 packet (version 4,
  IHL >= 5, total length equal to the datagram's, valid header checksum, TTL left) whose source
  lies in that very peer's subnet and whose destination lies in ours.

Everything refused is named by a `Drop` reason, which the datapath counts. The header
arithmetic (lengths, checksums, the TTL) is `ipv4`'s.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from .ipv4 import IP_HL, IPPROTO_ICMP, Buf, checksum, decrement_ttl, header_ok, is_later_fragment

DEFAULT_PORT = 8285
ENCAP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8) headers
CAP_PARTIAL_CSUM = "csum"  # in BackendData "Cap": this node accepts unfinished L4 checksums
CAP_TRAIN = "train"  # ... and TCP super-packets as trains of tagged chunks (`trains.train`)
# BackendData {"Datapath": "kernel"}: the node's tc eBPF fast path takes what arrives, so the
# sender's fast path may send to it straight from the kernel (`kplan`)
DATAPATH_KEY, DATAPATH_KERNEL = "Datapath", "kernel"

ICMP_ERRORS = frozenset({3, 4, 5, 11, 12})  # unreachable, quench, redirect, time, parameter
_IP_HDR = struct.Struct("!BBHHHBBH4s4s")


class Drop(enum.Enum):
    """Why a packet was not forwarded; the value is the phrase used in logs."""

    UNKNOWN_SENDER = "sender is not a peer"
    BAD_SENDER_PORT = "sender port is not the backend Port"
    SHORT = "shorter than an IPv4 header"
    NOT_IPV4 = "not IPv4"
    BAD_IHL = "bad IPv4 header length"
    BAD_LENGTH = "IPv4 total length differs from the datagram"
    BAD_CHECKSUM = "bad IPv4 header checksum"
    SPOOFED_SOURCE = "inner source outside the sender's subnet"
    NOT_FOR_US = "inner destination outside this node's subnet"
    TTL_EXPIRED = "TTL expired"
    NO_PEER = "no peer holds the destination (ICMP unreachable sent)"
    NO_PEER_SILENT = "no peer holds the destination (no ICMP: ICMP error or fragment)"
    OUTSIDE_NETWORK = "destination outside the cluster network"
    BAD_OFFLOAD = "malformed offload (virtio-net) request from the TUN"
    BAD_TRAIN = "train chunk out of place, or a train that is not one TCP packet"
    TRUNCATED = "datagram larger than the receive buffer"
    SEND_FAILED = "UDP send failed"
    WRITE_FAILED = "TUN write failed"
    INTERNAL = "internal error (a bug; logged with its traceback)"


@dataclass(frozen=True)
class Peer:
    """A node we tunnel to: its subnet, where its datagrams come from and go to, and whether
    it advertised `CAP_PARTIAL_CSUM` (then TCP/UDP checksums are left for its kernel) and
    `CAP_TRAIN` too (then TCP super-packets go to it as trains), and whether it runs the
    kernel fast path (then ours encapsulates to it in the kernel)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    port: int = DEFAULT_PORT
    partial_csum: bool = False
    train: bool = False
    kernel: bool = False
    addr: tuple[str, int] = field(init=False, compare=False)  # the sendto() address

    def __post_init__(self) -> None:
        object.__setattr__(self, "addr", (str(self.public_ip), self.port))


@dataclass(frozen=True)
class Reply:
    """Drop the packet for `reason` and write `packet` (an ICMP error) back to the TUN."""

    reason: Drop
    packet: bytes


Egress = Peer | Reply | Drop


def _mask(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


def unreachable(tun_addr: bytes, buf: Buf, off: int, end: int) -> bytes | None:
    """An ICMP net-unreachable from `tun_addr` about the IPv4 packet buf[off:end], quoting
    its header and 8 bytes (RFC 792); None for an ICMP error or a non-first fragment."""
    ihl = IP_HL[buf[off]]
    if buf[off + 9] == IPPROTO_ICMP and (end - off <= ihl or buf[off + ihl] in ICMP_ERRORS):
        return None
    if is_later_fragment(buf, off):
        return None
    icmp = bytearray(8) + buf[off : min(end, off + ihl + 8)]
    icmp[0] = 3  # destination unreachable, code 0: net unreachable
    icmp[2:4] = checksum(icmp).to_bytes(2, "big")
    src = bytes(buf[off + 12 : off + 16])
    hdr = bytearray(_IP_HDR.pack(0x45, 0, 20 + len(icmp), 0, 0, 64, IPPROTO_ICMP, 0, tun_addr, src))
    hdr[10:12] = checksum(hdr).to_bytes(2, "big")
    return bytes(hdr + icmp)


class Routes:
    """One immutable snapshot of the cluster as the datapath sees it (see the module doc)."""

    def __init__(
        self,
        network: IPv4Network,
        subnet_len: int,
        local: IPv4Network,
        peers: Iterable[Peer] = (),
        port: int = DEFAULT_PORT,
    ) -> None:
        self.network = network
        self.local = local
        self.port = port
        self.tun_addr = local.network_address.packed
        self._net, self._net_mask = int(network.network_address), _mask(network.prefixlen)
        self._local, self._local_mask = int(local.network_address), _mask(local.prefixlen)
        self._mask = _mask(subnet_len)
        self._exact: dict[int, Peer] = {}
        longer: list[tuple[int, int, int, Peer]] = []
        shorter: list[tuple[int, int, int, Peer]] = []
        self._senders: dict[str, Peer] = {}
        self.peers = tuple(sorted(peers, key=lambda p: p.subnet))
        for peer in self.peers:
            net, plen = int(peer.subnet.network_address), peer.subnet.prefixlen
            if plen == subnet_len:
                self._exact[net] = peer
            else:
                (longer if plen > subnet_len else shorter).append((plen, net, _mask(plen), peer))
            self._senders.setdefault(peer.addr[0], peer)
        self._longer = [e[1:] for e in sorted(longer, key=lambda e: -e[0])]
        self._shorter = [e[1:] for e in sorted(shorter, key=lambda e: -e[0])]

    def lookup(self, addr: int) -> Peer | None:
        """The peer whose subnet holds `addr` (an IPv4 address as an int), longest prefix."""
        for net, mask, peer in self._longer:
            if addr & mask == net:
                return peer
        peer = self._exact.get(addr & self._mask)
        if peer is not None:
            return peer
        for net, mask, peer in self._shorter:
            if addr & mask == net:
                return peer
        return None

    # -- egress: TUN -> UDP ------------------------------------------------------------------
    def egress(self, buf: bytearray, off: int, end: int) -> Egress:
        """Decide about the packet buf[off:end] read from the TUN; on `Peer`, its TTL has been
        decremented in place."""
        if end - off < 20:
            return Drop.SHORT
        if buf[off] >> 4 != 4:
            return Drop.NOT_IPV4
        ihl = IP_HL[buf[off]]
        if ihl < 20 or off + ihl > end:
            return Drop.BAD_IHL
        dst = int.from_bytes(buf[off + 16 : off + 20], "big")
        peer = self.lookup(dst)
        if peer is None:
            if dst & self._net_mask != self._net:
                return Drop.OUTSIDE_NETWORK
            icmp = unreachable(self.tun_addr, buf, off, end)
            return Reply(Drop.NO_PEER, icmp) if icmp is not None else Drop.NO_PEER_SILENT
        if buf[off + 8] <= 1:
            return Drop.TTL_EXPIRED
        decrement_ttl(buf, off)
        return peer

    # -- ingress: UDP -> TUN -----------------------------------------------------------------
    def sender(self, ip: str, port: int) -> Peer | Drop:
        """The peer a datagram from (ip, port) comes from, or why it is refused."""
        peer = self._senders.get(ip)
        if peer is None:
            return Drop.UNKNOWN_SENDER
        if port != self.port:
            return Drop.BAD_SENDER_PORT
        return peer

    def check(self, ip: str, buf: Buf, off: int, end: int) -> Drop | None:
        """Why the datagram buf[off:end] from the admitted sender `ip` must not reach the TUN,
        or None when it holds one valid IPv4 packet from that peer's subnet to ours."""
        n = end - off
        if n < 20:
            return Drop.SHORT
        if buf[off] >> 4 != 4:
            return Drop.NOT_IPV4
        ihl = IP_HL[buf[off]]
        if ihl < 20 or ihl > n:
            return Drop.BAD_IHL
        if buf[off + 2] << 8 | buf[off + 3] != n:
            return Drop.BAD_LENGTH
        if not header_ok(buf, off, ihl):
            return Drop.BAD_CHECKSUM
        owner = self.lookup(int.from_bytes(buf[off + 12 : off + 16], "big"))
        if owner is None or owner.addr[0] != ip:
            return Drop.SPOOFED_SOURCE
        if int.from_bytes(buf[off + 16 : off + 20], "big") & self._local_mask != self._local:
            return Drop.NOT_FOR_US
        if buf[off + 8] <= 1:
            return Drop.TTL_EXPIRED
        return None

    def ingress(self, ip: str, port: int, buf: bytearray, off: int, end: int) -> Peer | Drop:
        """`sender` then `check` for one datagram; on acceptance the TTL is decremented in
        place and the sending peer returned."""
        peer = self.sender(ip, port)
        if isinstance(peer, Drop):
            return peer
        reason = self.check(ip, buf, off, end)
        if reason is not None:
            return reason
        decrement_ttl(buf, off)
        return peer
