"""wireguard end to end: three lab nodes, real agents, real etcd, real WireGuard. This
machine's kernel has no WireGuard, so every node runs the userspace path (wireguard-go driven
over the agent's own UAPI socket); the kernel path is not exercised here.

Asserted on state: the device and its peers as wireguard-go reports them on the agent's
socket, the lease records, frames captured on the switch, datagrams a container received."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from backends.wireguard.keys import decode_key, encode_key, public_key
from backends.wireguard.uapi import parse_get, set_request

from .cluster import as_found, ours, running, wait_until
from .wireguard_kit import (
    CAPTURE,
    CONFIG,
    LISTENER,
    PORT,
    SENDER,
    ask,
    comm,
    comms,
    device,
    drop_dangling_links,
    finish,
    in_ns,
    need_wireguard_go,
    node_key,
    peers_by_subnet,
    record,
    sock,
    starts,
    uapi_set,
)


@pytest.fixture(scope="module")
def shared():
    need_wireguard_go()
    try:
        with running(CONFIG, ("--reconcile-interval=2",)) as c:
            yield c
    finally:
        drop_dangling_links()


@pytest.fixture
def cluster(shared):
    with as_found(shared):
        yield shared


# -- the datapath --------------------------------------------------------------------------------
def test_every_container_reaches_every_other_node(cluster):
    cluster.assert_all_reachable()
    n1, n2, n3 = cluster.lab.nodes
    assert cluster.env(n1)["FLANNEL_MTU"] == "1420"  # underlay 1500 - 80
    link = json.loads(cluster.lab.run(n1.ns, "ip", "-j", "-d", "link", "show", "flannel-wg").stdout)
    assert link[0]["mtu"] == 1420 and "UP" in link[0]["flags"]
    [route] = [r for r in cluster.routes(n1) if r["dst"] == "10.244.0.0/16"]
    assert route["dev"] == "flannel-wg" and ours(route)
    # the reference's record, the key the agent keeps (0400) behind it
    doc = record(cluster, n1)
    assert doc["BackendType"] == "wireguard" and doc["PublicIP"] == n1.ip
    keyfile = cluster.state_dir(n1) / "wgkey"
    assert keyfile.stat().st_mode & 0o777 == 0o400
    assert decode_key(doc["BackendData"]["PublicKey"]) == public_key(
        decode_key(keyfile.read_text())
    )
    # one peer per other node: its key, its PublicIP:51820, its subnet
    state = device(cluster, n1)
    assert state.listen_port == PORT
    assert peers_by_subnet(state) == {cluster.subnet(n): node_key(cluster, n) for n in (n2, n3)}
    assert {str(p.endpoint[0]) for p in state.peers.values()} == {n2.ip, n3.ip}


def test_payload_never_visible_on_the_underlay(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    pattern = b"flannel-wg-secret-" + secrets.token_hex(8).encode()
    payload = pattern * 8
    capture = in_ns(cluster, lab.switch_ns, CAPTURE, "6", pattern.hex(), str(PORT))
    listener = in_ns(cluster, n2.containers[0].ns, LISTENER, "5")
    lab.run(
        n1.containers[0].ns, sys.executable, "-c", SENDER, n2.containers[0].ip, payload.hex(), "50"
    )
    got = finish(listener)
    seen = json.loads(finish(capture)[-1])
    assert sum(bytes.fromhex(d) == payload for d in got) >= 45  # delivered (UDP: a few may drop)
    assert seen["wireguard"] >= 45  # the capture saw the traffic, as WireGuard datagrams
    assert seen["pattern"] == 0, seen


def test_a_datagram_from_a_non_peer_reaches_no_container(cluster):
    """From the switch (192.0.2.1, no lease): to the WireGuard port, a plain IPv4/UDP packet
    for n1's container, and the same behind a WireGuard transport header; neither arrives."""
    lab = cluster.lab
    n1 = lab.nodes[0]
    c1 = n1.containers[0]
    inner = _udp_packet("192.0.2.1", c1.ip, b"from-a-non-peer")
    transport = (4).to_bytes(4, "little") + bytes(4) + bytes(8) + inner  # type 4: data
    listener = in_ns(cluster, c1.ns, LISTENER, "3")
    sender = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for hexed in sys.argv[2:]:\n"
        "    for _ in range(5): s.sendto(bytes.fromhex(hexed), (sys.argv[1], 51820))\n"
    )
    lab.run(lab.switch_ns, sys.executable, "-c", sender, n1.ip, inner.hex(), transport.hex())
    assert finish(listener) == []
    assert lab.ping(n1.containers[0].ns, lab.nodes[1].containers[0].ip)  # peers still do


ROGUE = r"""
import asyncio, os, sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from backends.wireguard.keys import clamp, decode_key
from backends.wireguard.uapi import PeerConfig
from backends.wireguard.userspace import UserspaceDevice
async def main():
    dev = UserspaceDevice("rogue0", Path(sys.argv[1]))
    await dev.ensure()
    target = PeerConfig(decode_key(sys.argv[2]), (IPv4Address(sys.argv[3]), 51820),
                        frozenset({IPv4Network("10.244.0.0/16")}), 1)
    await dev.set(private_key=clamp(os.urandom(32)), listen_port=51999, upsert=[target])
asyncio.run(main())
"""


def test_a_wireguard_speaker_that_is_no_peer_gets_nothing_in(cluster):
    """A real WireGuard device on the switch (a host with no lease) that knows n1's public key
    and endpoint, as anyone can read them from etcd, sends to n1's container: its handshakes
    go unanswered, nothing reaches the container, n1 learns no peer."""
    lab = cluster.lab
    n1 = lab.nodes[0]
    c1 = n1.containers[0]
    run_dir = lab.workdir / "rogue"
    key = record(cluster, n1)["BackendData"]["PublicKey"]
    lab.run(lab.switch_ns, sys.executable, "-c", ROGUE, str(run_dir), key, n1.ip)
    try:
        lab.run(lab.switch_ns, "ip", "addr", "add", "10.244.250.1/32", "dev", "rogue0")
        lab.run(lab.switch_ns, "ip", "link", "set", "rogue0", "up")
        lab.run(lab.switch_ns, "ip", "route", "add", f"{c1.ip}/32", "dev", "rogue0")
        listener = in_ns(cluster, c1.ns, LISTENER, "4")
        lab.run(lab.switch_ns, sys.executable, "-c", SENDER, c1.ip, b"rogue".hex(), "100")
        assert finish(listener) == []
        assert len(parse_get(ask(run_dir / "rogue0.sock", b"get=1\n\n")).peers) == 1
        tx, rx = _counters(ask(run_dir / "rogue0.sock", b"get=1\n\n"))
        assert tx > 0 and rx == 0  # it sent handshake initiations; n1 answered none
        assert len(device(cluster, n1).peers) == 2
    finally:
        lab.run(lab.switch_ns, "ip", "link", "del", "rogue0", check=False)
        Path("/var/run/wireguard/rogue0.sock").unlink(missing_ok=True)


def _counters(answer: str) -> tuple[int, int]:
    values = dict(line.split("=", 1) for line in answer.splitlines() if "=" in line)
    return int(values["tx_bytes"]), int(values["rx_bytes"])


def _udp_packet(src: str, dst: str, payload: bytes) -> bytes:
    import struct

    udp = struct.pack("!HHHH", 4000, 9999, 8 + len(payload), 0) + payload
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    )  # fmt: skip
    total = sum(struct.unpack("!10H", hdr))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    hdr[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(hdr) + udp


# -- restarts and keys ---------------------------------------------------------------------------
def test_restart_keeps_the_key_and_the_traffic(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    key = node_key(cluster, n2)
    stream = lab.ping_stream(n1.containers[0].ns, n2.containers[0].ip, seconds=5, interval=0.02)
    time.sleep(0.5)
    cluster.stop(n2)
    time.sleep(1)  # no agent on n2: wireguard-go alone carries the stream
    cluster.start(n2)
    cluster.wait_ready(n2)
    cluster.wait_serving(n2)
    sent, answered = lab.stream_result(stream)
    assert sent >= 150 and answered == sent, f"{sent - answered} of {sent} pings lost"
    assert node_key(cluster, n2) == key
    assert starts(cluster, n2) == 0  # the new agent adopted the running wireguard-go
    assert device(cluster, n1).peers[key].allowed_ips  # n1 still has n2 under the same key


def test_a_new_key_is_taken_everywhere_within_one_reconcile(cluster):
    lab = cluster.lab
    n1, n2, n3 = lab.nodes
    old = node_key(cluster, n3)
    cluster.stop(n3)
    (cluster.state_dir(n3) / "wgkey").unlink()
    cluster.start(n3)
    cluster.wait_ready(n3)
    cluster.wait_serving(n3)
    new = node_key(cluster, n3)
    assert new != old and device(cluster, n3).private_key != bytes(32)
    assert public_key(device(cluster, n3).private_key) == new
    t0 = time.monotonic()
    for node in (n1, n2):
        wait_until(
            lambda node=node: peers_by_subnet(device(cluster, node)).get(cluster.subnet(n3)) == new,
            3,  # an event pass, well within one --reconcile-interval (2 s)
            what=f"{node.name} to take n3's new key",
        )
        assert old not in device(cluster, node).peers
    assert time.monotonic() - t0 < 3
    assert lab.ping(n1.containers[0].ns, n3.containers[0].ip)
    assert lab.ping(n3.containers[0].ns, n2.containers[0].ip)


# -- drift ----------------------------------------------------------------------------------------
def test_a_hand_removed_peer_is_restored(cluster):
    n1, n2, n3 = cluster.lab.nodes
    key = node_key(cluster, n2)
    repaired = cluster.metric_samples(n1).get(
        'flannel_entries_total{kind="peer",op="repaired"}', 0.0
    )
    full = 'flannel_reconcile_runs_total{mode="full"}'
    runs = cluster.metric_samples(n1)[full]
    # right after a full pass, so that the next one is about 2 s away: the status still sees
    # the peer missing
    wait_until(lambda: cluster.metric_samples(n1)[full] > runs, 5, what="a full pass")
    uapi_set(cluster, n1, set_request(remove=[key]))
    assert key not in device(cluster, n1).peers
    peers = {p["subnet"]: p for p in cluster.status(n1)["peers"]}
    assert peers[cluster.subnet(n2)]["state"] == "drifted"
    assert peers[cluster.subnet(n3)]["state"] == "ok"
    wait_until(lambda: key in device(cluster, n1).peers, 6, what="the peer restored")
    assert peers_by_subnet(device(cluster, n1))[cluster.subnet(n2)] == key
    samples = cluster.metric_samples(n1)
    assert samples['flannel_entries_total{kind="peer",op="repaired"}'] == repaired + 1
    assert all(p["state"] == "ok" for p in cluster.status(n1)["peers"])
    assert cluster.lab.ping(n1.containers[0].ns, n2.containers[0].ip)


@pytest.mark.parametrize("how", ["device deleted", "wireguard-go killed"])
def test_a_lost_device_is_made_again_and_every_peer_replayed(cluster, how):
    lab = cluster.lab
    n1, n2, n3 = lab.nodes
    before = starts(cluster, n1)
    if how == "device deleted":
        lab.run(n1.ns, "ip", "link", "del", "flannel-wg")
    else:
        pids = lab.run(n1.ns, "ip", "netns", "pids", n1.ns).stdout.split()
        [pid] = [p for p in pids if comm(p) == "wireguard-go"]
        os.kill(int(pid), signal.SIGKILL)
    wait_until(lambda: starts(cluster, n1) == before + 1, 8, what="wireguard-go started again")
    wait_until(
        lambda: (
            set(peers_by_subnet(device(cluster, n1))) == {cluster.subnet(n2), cluster.subnet(n3)}
        ),
        5,
        what="every peer replayed",
    )
    cluster.assert_all_reachable(timeout=10)


# -- hostile records -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [{"PublicKey": "not-a-key"}, {}, {"PublicKey": encode_key(bytes(32))}],
    ids=["garbage", "missing", "small order"],
)
def test_a_record_without_a_usable_key_is_skipped_and_counted(cluster, data):
    lab = cluster.lab
    n1 = lab.nodes[0]
    key = cluster.lease_key("10.244.250.0/24")
    doc = {"PublicIP": "192.0.2.99", "BackendType": "wireguard", "BackendData": data}
    lab.etcdctl("put", key, json.dumps(doc))
    try:
        wait_until(
            lambda: cluster.metric_samples(n1).get("flannel_wireguard_peers_skipped") == 1,
            5,
            what="the record counted as skipped",
        )
        assert "10.244.250.0/24" not in peers_by_subnet(device(cluster, n1))
        assert len(device(cluster, n1).peers) == 2
        cluster.assert_all_reachable(timeout=5)
        assert all(p.poll() is None for p in cluster.procs.values())
    finally:
        lab.etcdctl("del", key)
    wait_until(
        lambda: cluster.metric_samples(n1).get("flannel_wireguard_peers_skipped") == 0,
        5,
        what="the skip count back to 0",
    )


def test_cleanup_removes_the_device_and_ends_wireguard_go(cluster):
    lab = cluster.lab
    n3 = lab.nodes[2]
    cluster.stop(n3)
    assert "wireguard-go" in comms(lab, n3)  # it outlives the agent
    out = lab.run(n3.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup").stdout
    assert "device flannel-wg (tun)" in out
    wait_until(lambda: "wireguard-go" not in comms(lab, n3), 5, what="wireguard-go to end")
    assert not sock(cluster, n3).exists()
    assert lab.run(n3.ns, "ip", "link", "show", "flannel-wg", check=False).returncode != 0
    assert not [r for r in cluster.routes(n3) if ours(r)]
    # `as_found` starts the agent again: a new wireguard-go, the same key


# -- a preshared key -----------------------------------------------------------------------------
def test_the_psk_is_used_and_a_node_with_another_one_gets_no_traffic(tmp_path):
    """The config's PSK on every peer; a node whose WIREGUARD_PSK_FILE holds another PSK (the
    file wins) completes no handshake."""
    psk = encode_key(os.urandom(32))
    need_wireguard_go()
    config = {**CONFIG, "Backend": {"Type": "wireguard", "PSK": psk}}
    other = tmp_path / "psk"
    other.write_text(encode_key(os.urandom(32)) + "\n")
    try:
        with running(config, ("--reconcile-interval=2",), start=2) as c:
            n1, n2, n3 = c.lab.nodes
            assert c.lab.ping(n1.containers[0].ns, n2.containers[0].ip)
            assert {p.psk for p in device(c, n1).peers.values()} == {decode_key(psk)}
            c.start(n3, env={"WIREGUARD_PSK_FILE": str(other)})
            c.wait_ready(n3)
            wait_until(lambda: len(device(c, n1).peers) == 2, 5, what="n1 to know n3")
            assert {p.psk for p in device(c, n3).peers.values()} == {decode_key(other.read_text())}
            assert not c.lab.ping(n1.containers[0].ns, n3.containers[0].ip, count=3, timeout=1)
            assert c.lab.ping(n1.containers[0].ns, n2.containers[0].ip)
    finally:
        drop_dangling_links()
