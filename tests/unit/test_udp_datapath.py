"""The datapath's receive dispatch between packets and trains, on a real UDP socket, with a
pipe standing in for the TUN (what is written to it is read back and parsed)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

import pytest

from backends.udp import offload as O
from backends.udp.core import Drop
from backends.udp.datapath import Datapath

from .test_udp_offload import A_IP, B_T, MTU, tcp_packet, train_of

F_SETPIPE_SZ = 1031


@pytest.fixture
def dp():
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 20)
    os.set_blocking(r, False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))  # nothing arrives: the continuation receive finds nothing
    path = Datapath(w, sock, True, B_T, MTU)
    path.written = lambda: _writes(r)  # type: ignore[attr-defined]
    yield path
    sock.close()
    os.close(r)
    os.close(w)
    os.close(path._wake_r)
    os.close(path._wake_w)


def _writes(fd: int) -> list[tuple[tuple[int, ...], bytes]]:
    """The (virtio-net header, packet) pairs written so far."""
    data = b""
    while True:
        try:
            data += os.read(fd, 1 << 20)
        except BlockingIOError:
            break
    out, at = [], 0
    while at < len(data):
        vnet = O.VNET.unpack_from(data, at)
        size = struct.unpack_from("!H", data, at + O.VNET_LEN + 2)[0]
        out.append((vnet, data[at + O.VNET_LEN : at + O.VNET_LEN + size]))
        at += O.VNET_LEN + size
    return out


def receive(dp: Datapath, dgrams: list[bytes], src: str = A_IP) -> None:
    """One receive of `dgrams` (a GRO batch), put where the datapath's next receive goes."""
    data = b"".join(dgrams)
    if dp._rx is dp._flat:
        dp._ubuf[: len(data)] = data
    else:
        dp._pair[0].load(data)
    gro = [(17, 104, struct.pack("=i", len(dgrams[0])))]  # UDP_GRO's segment size
    dp._ingress_vnet(len(data), gro if len(dgrams) > 1 else [], (src, 8285))


def test_a_packet_and_a_train_in_one_batch_are_both_written(dp) -> None:
    """GRO batches equal-sized datagrams of one flow: a full-size packet then a train."""
    packet = bytes(tcp_packet(os.urandom(MTU - 52), flags=O.ACK))
    assert len(packet) == MTU
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 20), seq=50000, flags=O.ACK))
    receive(dp, [packet, *dgrams[:-1]])  # the train's short last chunk comes alone
    receive(dp, dgrams[-1:])
    got = dp.written()
    assert not dp.drops, dp.drops
    assert [len(p) for _, p in got] == [len(packet), len(sent)]
    assert got[1][1][20:36] == sent[20:36] and got[1][1][38:] == sent[38:]
    assert dp.trains_in == 1


def test_trains_from_a_stranger_or_of_tiny_datagrams_lay_out_nothing(dp) -> None:
    layouts = dict(dp._scatters)
    for size in range(3, 12):  # each would need a receive layout of its own
        receive(dp, [b"\xf0\x00" + bytes(size - 2)] * 3, src="203.0.113.9")
    assert dp._scatters == layouts
    assert dp.drops == {Drop.UNKNOWN_SENDER: 27}
    for size in range(3, 12):  # from the peer itself: too small to be chunks of a train
        receive(dp, [b"\xf0\x00" + bytes(size - 2)] * 3)
    assert dp._scatters == layouts and dp.drops[Drop.BAD_TRAIN] == 27
    assert dp.written() == []


def test_a_train_then_a_batch_of_packets_switch_layouts_and_lose_nothing(dp) -> None:
    dgrams, sent = train_of(tcp_packet(os.urandom(1420 * 46), flags=O.ACK))
    receive(dp, dgrams)
    assert (dp._pair[0].hl, dp._pair[0].seg) == (O.TAG_LEN, MTU)
    packets = [bytes(tcp_packet(os.urandom(MTU - 52), seq=s, flags=O.ACK)) for s in (1, 2)]
    receive(dp, packets)
    got = dp.written()
    assert not dp.drops and [len(p) for _, p in got] == [len(sent), MTU, MTU]
