"""The udp backend's pure core: routing, egress and ingress decisions, ICMP, TTL, checksums."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.udp import advertised, parse_port, plan
from backends.udp.core import Drop, Peer, Reply, Routes
from backends.udp.ipv4 import checksum, decrement_ttl, header_ok, ones_sum, pseudo_sum
from flanneld.core.config import ConfigError
from flanneld.core.lease import Lease, LeaseAttrs

NETWORK = IPv4Network("10.244.0.0/16")
LOCAL = IPv4Network("10.244.1.0/24")
P2 = Peer(IPv4Network("10.244.2.0/24"), IPv4Address("192.0.2.12"), 8285, True)
P3 = Peer(IPv4Network("10.244.3.0/24"), IPv4Address("192.0.2.13"), 8285, False)
P5 = Peer(IPv4Network("10.244.5.0/24"), IPv4Address("192.0.2.15"))
P5B = Peer(IPv4Network("10.244.5.128/25"), IPv4Address("192.0.2.16"))  # longer prefix
P6 = Peer(IPv4Network("10.244.6.0/23"), IPv4Address("192.0.2.17"))  # shorter prefix
ROUTES = Routes(NETWORK, 24, LOCAL, [P2, P3, P5, P5B, P6])


def ip_packet(
    src: str,
    dst: str,
    proto: int = 17,
    payload: bytes = b"\x12\x34\x00\x35\x00\x0c\x00\x00data",
    ttl: int = 64,
    frag: int = 0x4000,
    options: bytes = b"",
) -> bytearray:
    """A well-formed IPv4 packet (UDP 4660 -> 53 by default) with a valid header checksum."""
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(payload)
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            total,
            0x1234,
            frag,
            ttl,
            proto,
            0,
            ip_address(src).packed,
            ip_address(dst).packed,
        )
        + options
    )
    hdr[10:12] = checksum(hdr).to_bytes(2, "big")
    return hdr + payload


def reference_checksum(data: bytes) -> int:
    """RFC 1071 the textbook way, to check the fast one against."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def valid(pkt: bytes) -> bool:
    return reference_checksum(bytes(pkt[: (pkt[0] & 0x0F) * 4])) == 0


# -- checksums --------------------------------------------------------------------------------


def test_checksum_matches_rfc1071_example() -> None:
    data = bytes.fromhex("0001f203f4f5f6f7")  # RFC 1071 section 3: sum ddf2, checksum 220d
    assert ones_sum(data) == 0xDDF2
    assert checksum(data) == 0x220D


@given(st.binary(min_size=1, max_size=200).filter(any))
def test_checksum_agrees_with_the_textbook_one(data: bytes) -> None:
    ours = checksum(data)
    assert ours % 0xFFFF == reference_checksum(data) % 0xFFFF  # 0 and 0xFFFF are one value
    padded = data + (b"\0" if len(data) % 2 else b"")
    assert reference_checksum(padded + ours.to_bytes(2, "big")) in (0, 0xFFFF)


def test_pseudo_sum_is_what_a_kernel_stores_for_a_partial_checksum() -> None:
    pkt = ip_packet("10.244.1.2", "10.244.2.3")
    udp = pkt[20:]
    field = pseudo_sum(pkt[12:20], 17, len(udp))
    # finishing from the partial field gives the real checksum
    finished = checksum(udp[:6] + field.to_bytes(2, "big") + udp[8:])
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert finished % 0xFFFF == reference_checksum(pseudo + udp[:6] + b"\0\0" + udp[8:]) % 0xFFFF


@settings(max_examples=300)
@given(
    ttl=st.integers(2, 255),
    proto=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    src=st.integers(0, 2**32 - 1),
    tos=st.integers(0, 255),
)
def test_ttl_decrement_rfc1624_equals_recomputation(ttl, proto, ident, src, tos) -> None:
    pkt = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            tos,
            20,
            ident,
            0,
            ttl,
            proto,
            0,
            src.to_bytes(4),
            b"\x0a\xf4\x01\x02",
        )
    )
    pkt[10:12] = reference_checksum(bytes(pkt)).to_bytes(2, "big")
    decrement_ttl(pkt, 0)
    assert pkt[8] == ttl - 1
    fresh = bytearray(pkt)
    fresh[10:12] = b"\0\0"
    assert pkt[10:12] == reference_checksum(bytes(fresh)).to_bytes(2, "big")
    assert header_ok(pkt, 0, 20)


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "peer"),
    [
        ("10.244.2.1", P2),
        ("10.244.2.255", P2),
        ("10.244.3.77", P3),
        ("10.244.5.1", P5),
        ("10.244.5.130", P5B),  # the /25 inside the /24 wins
        ("10.244.6.9", P6),
        ("10.244.7.9", P6),  # the /23's upper half
        ("10.244.1.5", None),  # our own subnet: not a peer
        ("10.244.9.1", None),
        ("192.0.2.12", None),
    ],
)
def test_lookup_longest_prefix(dst: str, peer: Peer | None) -> None:
    assert ROUTES.lookup(int(IPv4Address(dst))) is peer


def test_lookup_with_no_peers() -> None:
    assert Routes(NETWORK, 24, LOCAL).lookup(int(IPv4Address("10.244.2.1"))) is None


# -- egress -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "ttl", "expected"),
    [
        ("10.244.2.9", 64, P2),
        ("10.244.3.9", 2, P3),
        ("10.244.2.9", 1, Drop.TTL_EXPIRED),
        ("10.244.2.9", 0, Drop.TTL_EXPIRED),
        ("10.244.9.9", 64, Drop.NO_PEER),
        ("10.244.1.9", 64, Drop.NO_PEER),
        ("172.16.0.1", 64, Drop.OUTSIDE_NETWORK),
    ],
)
def test_egress(dst: str, ttl: int, expected: Peer | Drop) -> None:
    pkt = ip_packet("10.244.1.2", dst, ttl=ttl)
    out = ROUTES.egress(pkt, 0, len(pkt))
    if isinstance(out, Reply):
        assert out.reason is expected
    else:
        assert out is expected
    if isinstance(out, Peer):
        assert pkt[8] == ttl - 1 and valid(pkt)


@pytest.mark.parametrize(
    ("pkt", "reason"),
    [
        (bytearray(ip_packet("10.244.1.2", "10.244.2.9")[:19]), Drop.SHORT),
        (bytearray(b"\x60" + bytes(39)), Drop.NOT_IPV4),
        (bytearray(b"\x44" + bytes(39)), Drop.BAD_IHL),
        (bytearray(b"\x4f" + bytes(39)), Drop.BAD_IHL),
    ],
)
def test_egress_malformed(pkt: bytearray, reason: Drop) -> None:
    assert ROUTES.egress(pkt, 0, len(pkt)) is reason


def test_egress_at_an_offset_leaves_the_rest_alone() -> None:
    pkt = ip_packet("10.244.1.2", "10.244.2.9")
    buf = bytearray(b"\xaa" * 10) + pkt + b"\xbb"
    assert ROUTES.egress(buf, 10, 10 + len(pkt)) is P2
    assert buf[:10] == b"\xaa" * 10 and buf[-1:] == b"\xbb"


def test_icmp_unreachable_contents() -> None:
    pkt = ip_packet("10.244.1.2", "10.244.9.9", payload=b"\x12\x34\x00\x35\x00\x10\x00\x00abcdefgh")
    out = ROUTES.egress(pkt, 0, len(pkt))
    assert isinstance(out, Reply) and out.reason is Drop.NO_PEER
    icmp = out.packet
    assert icmp[0] == 0x45 and icmp[9] == 1 and icmp[8] == 64
    assert struct.unpack("!H", icmp[2:4])[0] == len(icmp) == 20 + 8 + 20 + 8
    assert icmp[12:16] == IPv4Address("10.244.1.0").packed  # the TUN address
    assert icmp[16:20] == IPv4Address("10.244.1.2").packed  # back to the sender
    assert valid(icmp)
    assert icmp[20:22] == b"\x03\x00"  # destination unreachable, net unreachable
    assert reference_checksum(icmp[20:]) == 0
    assert icmp[28:] == pkt[:28]  # the offender's header and first 8 bytes
    assert pkt[8] == 64  # the offender is not touched


def test_icmp_unreachable_quotes_ip_options_and_short_payloads() -> None:
    pkt = ip_packet("10.244.1.2", "10.244.9.9", payload=b"xy", options=b"\x01\x01\x01\x00")
    out = ROUTES.egress(pkt, 0, len(pkt))
    assert isinstance(out, Reply) and out.packet[28:] == pkt


@pytest.mark.parametrize(
    ("proto", "payload", "frag", "answered"),
    [
        (1, b"\x08\x00\x00\x00\x00\x01\x00\x01", 0x4000, True),  # echo request: answered
        (1, b"\x03\x01\x00\x00\x00\x00\x00\x00", 0x4000, False),  # an ICMP error: never
        (1, b"\x0b\x00\x00\x00\x00\x00\x00\x00", 0x4000, False),  # time exceeded
        (1, b"", 0x4000, False),  # ICMP without a type
        (17, b"12345678", 0x2000, True),  # first fragment (MF set)
        (17, b"12345678", 0x2001, False),  # a later fragment
        (17, b"12345678", 0x0010, False),  # the last fragment
    ],
)
def test_icmp_unreachable_only_where_allowed(proto, payload, frag, answered) -> None:
    pkt = ip_packet("10.244.1.2", "10.244.9.9", proto=proto, payload=payload, frag=frag)
    out = ROUTES.egress(pkt, 0, len(pkt))
    assert isinstance(out, Reply) is answered
    if not answered:
        assert out is Drop.NO_PEER_SILENT


# -- ingress ----------------------------------------------------------------------------------

GOOD = ip_packet("10.244.2.7", "10.244.1.3")


def bad_checksum() -> bytearray:
    pkt = bytearray(GOOD)
    pkt[10] ^= 0xFF
    return pkt


def with_total_length(n: int) -> bytearray:
    pkt = bytearray(GOOD)
    pkt[2:4] = n.to_bytes(2, "big")
    pkt[10:12] = b"\0\0"
    pkt[10:12] = checksum(pkt[:20]).to_bytes(2, "big")
    return pkt


@pytest.mark.parametrize(
    ("sender", "port", "pkt", "reason"),
    [
        ("192.0.2.12", 8285, GOOD, None),
        ("192.0.2.99", 8285, GOOD, Drop.UNKNOWN_SENDER),
        ("192.0.2.12", 8286, GOOD, Drop.BAD_SENDER_PORT),
        ("192.0.2.12", 8285, GOOD[:19], Drop.SHORT),
        ("192.0.2.12", 8285, bytearray(b"\x65") + GOOD[1:], Drop.NOT_IPV4),
        ("192.0.2.12", 8285, bytearray(b"\x44") + GOOD[1:], Drop.BAD_IHL),
        ("192.0.2.12", 8285, bytearray(b"\x4f") + GOOD[1:], Drop.BAD_IHL),
        ("192.0.2.12", 8285, GOOD[:-1], Drop.BAD_LENGTH),
        ("192.0.2.12", 8285, with_total_length(len(GOOD) + 1), Drop.BAD_LENGTH),
        ("192.0.2.12", 8285, bad_checksum(), Drop.BAD_CHECKSUM),
        ("192.0.2.13", 8285, GOOD, Drop.SPOOFED_SOURCE),  # a peer, but not 10.244.2.0/24's
        ("192.0.2.12", 8285, ip_packet("10.244.3.7", "10.244.1.3"), Drop.SPOOFED_SOURCE),
        ("192.0.2.12", 8285, ip_packet("10.244.1.7", "10.244.1.3"), Drop.SPOOFED_SOURCE),
        ("192.0.2.12", 8285, ip_packet("8.8.8.8", "10.244.1.3"), Drop.SPOOFED_SOURCE),
        ("192.0.2.12", 8285, ip_packet("10.244.2.7", "10.244.3.3"), Drop.NOT_FOR_US),
        ("192.0.2.12", 8285, ip_packet("10.244.2.7", "192.0.2.11"), Drop.NOT_FOR_US),
        ("192.0.2.12", 8285, ip_packet("10.244.2.7", "10.244.1.3", ttl=1), Drop.TTL_EXPIRED),
        ("192.0.2.12", 8285, ip_packet("10.244.2.7", "10.244.1.3", ttl=0), Drop.TTL_EXPIRED),
        ("192.0.2.16", 8285, ip_packet("10.244.5.130", "10.244.1.3"), None),
        ("192.0.2.15", 8285, ip_packet("10.244.5.130", "10.244.1.3"), Drop.SPOOFED_SOURCE),
    ],
)
def test_ingress(sender: str, port: int, pkt: bytes, reason: Drop | None) -> None:
    buf = bytearray(pkt)
    out = ROUTES.ingress(sender, port, buf, 0, len(buf))
    if reason is None:
        assert isinstance(out, Peer) and out.addr == (sender, 8285)
        assert buf[8] == pkt[8] - 1 and valid(buf) and buf[12:] == pkt[12:]
    else:
        assert out is reason
        assert buf == pkt  # a refused packet is left alone


def test_ingress_honours_the_configured_port() -> None:
    routes = Routes(NETWORK, 24, LOCAL, [P2], port=9000)
    buf = bytearray(GOOD)
    assert routes.ingress("192.0.2.12", 8285, buf, 0, len(buf)) is Drop.BAD_SENDER_PORT
    assert isinstance(routes.ingress("192.0.2.12", 9000, buf, 0, len(buf)), Peer)


def oracle(sender: str, port: int, pkt: bytes) -> bool:
    """Ingress validation written the slow, obvious way."""
    owners = {p.addr[0]: p for p in (P2, P3, P5, P5B, P6)}
    if sender not in owners or port != 8285 or len(pkt) < 20:
        return False
    ver_ihl, _, total, _, _, ttl, _, _, src, dst = struct.unpack("!BBHHHBBH4s4s", pkt[:20])
    ihl = (ver_ihl & 0x0F) * 4
    if ver_ihl >> 4 != 4 or ihl < 20 or ihl > len(pkt) or total != len(pkt):
        return False
    if reference_checksum(pkt[:ihl]) != 0 or ttl <= 1:
        return False
    src_a, dst_a = IPv4Address(src), IPv4Address(dst)
    holders = [p for p in (P2, P3, P5, P5B, P6) if src_a in p.subnet]
    owner = max(holders, key=lambda p: p.subnet.prefixlen, default=None)
    return owner is not None and owner.addr[0] == sender and dst_a in LOCAL


SENDERS = st.sampled_from(["192.0.2.12", "192.0.2.13", "192.0.2.16", "192.0.2.99"])


def mutated(data: st.DataObject) -> bytes:
    pkt = bytearray(
        ip_packet(
            data.draw(st.sampled_from(["10.244.2.7", "10.244.3.1", "10.244.5.200", "1.2.3.4"])),
            data.draw(st.sampled_from(["10.244.1.3", "10.244.2.3"])),
            ttl=data.draw(st.integers(0, 3)),
            payload=data.draw(st.binary(max_size=40)),
        )
    )
    for _ in range(data.draw(st.integers(0, 2))):
        pkt[data.draw(st.integers(0, len(pkt) - 1))] = data.draw(st.integers(0, 255))
    return bytes(pkt[: data.draw(st.integers(0, len(pkt)))])


@settings(max_examples=600)
@given(st.data())
def test_fuzz_ingress_accepts_exactly_what_the_oracle_accepts(data: st.DataObject) -> None:
    pkt = data.draw(st.one_of(st.binary(max_size=80), st.builds(mutated, st.data())))
    sender, port = data.draw(SENDERS), data.draw(st.sampled_from([8285, 8285, 1]))
    buf = bytearray(pkt)
    out = ROUTES.ingress(sender, port, buf, 0, len(buf))
    assert isinstance(out, Peer | Drop)
    assert isinstance(out, Peer) == oracle(sender, port, pkt)


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_fuzz_egress_never_raises(pkt: bytes) -> None:
    buf = bytearray(pkt)
    out = ROUTES.egress(buf, 0, len(buf))
    assert isinstance(out, Peer | Reply | Drop)
    if isinstance(out, Reply):
        assert valid(out.packet) and reference_checksum(out.packet[20:]) == 0


# -- plan and options -------------------------------------------------------------------------


def lease(subnet: str, ip: str, kind: str = "", data: object = None) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), kind, data))


def test_plan_skips_what_it_cannot_tunnel_to() -> None:
    local = lease("10.244.1.0/24", "192.0.2.11")
    peers = {
        IPv4Network("10.244.2.0/24"): lease("10.244.2.0/24", "192.0.2.12", "", {"Cap": ["csum"]}),
        IPv4Network("10.244.3.0/24"): lease("10.244.3.0/24", "192.0.2.13"),  # the reference's
        IPv4Network("10.244.4.0/24"): lease("10.244.4.0/24", "192.0.2.14", "UDP"),
        IPv4Network("10.244.5.0/24"): lease("10.244.5.0/24", "192.0.2.15", "vxlan"),
        IPv4Network("10.244.6.0/24"): lease("10.244.6.0/24", "192.0.2.11"),  # our PublicIP
        IPv4Network("10.244.1.0/24"): lease("10.244.1.0/24", "192.0.2.11"),  # our subnet
    }
    routes, warnings = plan(local, peers, NETWORK, 24, 8285)
    assert [(str(p.subnet), p.partial_csum) for p in routes.peers] == [
        ("10.244.2.0/24", True),
        ("10.244.3.0/24", False),
        ("10.244.4.0/24", False),
    ]
    assert routes.local == LOCAL and routes.tun_addr == IPv4Address("10.244.1.0").packed
    assert len(warnings) == 3
    assert any("'vxlan'" in w for w in warnings) and any("is ours" in w for w in warnings)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"Cap": ["csum"]}, True),
        ({"cap": ["gso", "csum"]}, True),
        ({"Cap": []}, False),
        ({"Cap": "csum"}, False),
        ({"VNI": 1}, False),
        (None, False),
        ([], False),
    ],
)
def test_capability(data: object, expected: bool) -> None:
    assert advertised(data, "csum") is expected


@pytest.mark.parametrize(
    ("options", "port"),
    [
        ({}, 8285),
        ({"Type": "udp", "Port": 9000}, 9000),
        ({"port": 7000}, 7000),
        ({"PORT": 0}, 8285),
    ],
)
def test_port_option(options: dict, port: int) -> None:
    assert parse_port(options) == port


@pytest.mark.parametrize("bad", ["8285", -1, 65536, True, 1.5])
def test_bad_port_option(bad: object) -> None:
    with pytest.raises(ConfigError, match="Backend.Port"):
        parse_port({"Port": bad})
