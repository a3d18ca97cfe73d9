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
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backends.wireguard.keys import decode_key, encode_key, public_key
from backends.wireguard.uapi import DeviceState, parse_get, set_request

from .cluster import PREFIX, as_found, ours, running, wait_until

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}
PORT = 51820

# Every frame on every port of the switch, for `seconds`: how many, how many carried WireGuard
# (UDP over IPv4 or IPv6 to or from its port), how many held the pattern anywhere.
CAPTURE = r"""
import json, socket, struct, sys, time
seconds, pattern, port = float(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
def udp_ports(data):
    if data[12:14] == b"\x08\x00" and data[23] == 17:
        at = 14 + (data[14] & 15) * 4
    elif data[12:14] == b"\x86\xdd" and data[20] == 17:
        at = 54
    else:
        return ()
    return struct.unpack("!HH", data[at:at + 4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
print("capturing", flush=True)
frames = wg = seen = 0
end = time.monotonic() + seconds
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        data = s.recv(65535)
    except TimeoutError:
        break
    frames += 1
    seen += pattern in data
    wg += port in udp_ports(data)
print(json.dumps({"frames": frames, "wireguard": wg, "pattern": seen}), flush=True)
"""

# Prints every datagram that reaches UDP 9999 for `seconds` (over IPv6 with a second arg "6").
LISTENER = r"""
import socket, sys, time
six = sys.argv[2:] == ["6"]
s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("::" if six else "0.0.0.0", 9999))
print("listening", flush=True)
end = time.monotonic() + float(sys.argv[1])
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        print(s.recv(4096).hex(), flush=True)
    except TimeoutError:
        break
"""

SENDER = r"""
import socket, sys, time
dst, payload, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(payload, (dst, 9999))
    time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def shared():
    if not any(
        os.access(os.path.join(d, "wireguard-go"), os.X_OK) for d in os.environ["PATH"].split(":")
    ):
        pytest.skip("wireguard-go is not installed (deploy/run-tests.sh installs it)")
    with running(CONFIG, ("--reconcile-interval=2",)) as c:
        yield c


@pytest.fixture
def cluster(shared):
    with as_found(shared):
        yield shared


def sock(c, node) -> Path:
    return c.state_dir(node) / "wireguard" / "flannel-wg.sock"


def device(c, node) -> DeviceState:
    """The node's WireGuard device as wireguard-go reports it on the agent's socket."""
    return parse_get(_ask(sock(c, node), b"get=1\n\n"))


def uapi_set(c, node, request: bytes) -> None:
    assert _ask(sock(c, node), request).endswith("errno=0\n\n")


def record(c, node) -> dict:
    return json.loads(c.lab.etcdctl("get", "--print-value-only", c.lease_key(c.subnet(node))))


def node_key(c, node) -> bytes:
    return decode_key(record(c, node)["BackendData"]["PublicKey"])


def peers_by_subnet(state: DeviceState) -> dict[str, bytes]:
    return {str(net): p.public_key for p in state.peers.values() for net in p.allowed_ips}


def in_ns(c, ns: str, script: str, *args: str) -> subprocess.Popen[str]:
    """A Python script in namespace `ns`, its stdout piped; the caller ends it."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # "capturing" / "listening": it is ready
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> list[str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return [line for line in out.splitlines() if line]


def starts(c, node) -> float:
    return c.metric_samples(node).get("flannel_wireguard_go_starts_total", 0.0)


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
        assert len(parse_get(_ask(run_dir / "rogue0.sock", b"get=1\n\n")).peers) == 1
        tx, rx = _counters(_ask(run_dir / "rogue0.sock", b"get=1\n\n"))
        assert tx > 0 and rx == 0  # it sent handshake initiations; n1 answered none
        assert len(device(cluster, n1).peers) == 2
    finally:
        lab.run(lab.switch_ns, "ip", "link", "del", "rogue0", check=False)
        Path("/var/run/wireguard/rogue0.sock").unlink(missing_ok=True)


def _ask(path, request: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


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
        [pid] = [p for p in pids if _comm(p) == "wireguard-go"]
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


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


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
    assert "wireguard-go" in _comms(lab, n3)  # it outlives the agent
    out = lab.run(n3.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup").stdout
    assert "device flannel-wg (tun)" in out
    wait_until(lambda: "wireguard-go" not in _comms(lab, n3), 5, what="wireguard-go to end")
    assert not sock(cluster, n3).exists()
    assert lab.run(n3.ns, "ip", "link", "show", "flannel-wg", check=False).returncode != 0
    assert not [r for r in cluster.routes(n3) if ours(r)]
    # `as_found` starts the agent again: a new wireguard-go, the same key


def _comms(lab, node) -> list[str]:
    return [_comm(pid) for pid in lab.run(node.ns, "ip", "netns", "pids", node.ns).stdout.split()]


# -- dual-stack and IPv6-only ---------------------------------------------------------------------
@pytest.mark.parametrize("ipv4", [True, False], ids=["dual-stack", "IPv6-only"])
def test_a_device_per_family(ipv4):
    """The reference's "separate" mode: flannel-wg-v6 (beside flannel-wg in dual-stack), the
    same key in BackendV6Data, peers at [PublicIPv6]:51821 with their IPv6 subnets; the ping
    matrices, and a payload sent over IPv6 never visible on the switch. IPv6-only: no IPv4
    device, route or BackendData (PublicIP 0.0.0.0, as the reference writes it)."""
    from ipaddress import IPv6Address, IPv6Network

    config = {**CONFIG, "EnableIPv6": True, "IPv6Network": "fd00:10:244::/56"}
    if not ipv4:
        config["EnableIPv4"] = False
    with running(config, ("--reconcile-interval=2",), ipv6=True) as c:
        lab = c.lab
        n1, n2, n3 = lab.nodes
        if ipv4:
            c.assert_all_reachable()
        matrix6 = c.wait_reachable(10, family=6)
        assert matrix6 and all(matrix6.values()), matrix6
        assert c.env(n1)["FLANNEL_MTU"] == "1420"
        link = json.loads(lab.run(n1.ns, "ip", "-j", "link", "show", "flannel-wg-v6").stdout)
        assert link[0]["mtu"] == 1420 and "UP" in link[0]["flags"]
        routes6 = json.loads(lab.run(n1.ns, "ip", "-6", "-j", "route", "show").stdout)
        [route] = [r for r in routes6 if r["dst"] == "fd00:10:244::/56"]
        assert route["dev"] == "flannel-wg-v6" and ours(route)
        key_of = {}
        records = [
            json.loads(v)
            for v in lab.etcdctl("get", "--prefix", "--print-value-only", f"{PREFIX}/subnets/")
            .strip()
            .split("\n")
        ]
        for doc in records:
            key_of[doc["PublicIPv6"]] = decode_key(doc["BackendV6Data"]["PublicKey"])
            if ipv4:
                assert doc["BackendData"] == doc["BackendV6Data"]
            else:
                assert doc["PublicIP"] == "0.0.0.0" and "BackendData" not in doc
        assert set(key_of) == {n.ip6 for n in lab.nodes}
        if not ipv4:
            names = {x["ifname"] for x in json.loads(lab.run(n1.ns, "ip", "-j", "link").stdout)}
            assert "flannel-wg" not in names
            assert not [r for r in c.routes(n1) if ours(r)]

        def subnet6(node) -> str:
            return str(IPv6Network(c.env(node)["FLANNEL_IPV6_SUBNET"], strict=False))

        path6 = c.state_dir(n1) / "wireguard" / "flannel-wg-v6.sock"
        state6 = parse_get(_ask(path6, b"get=1\n\n"))
        assert state6.listen_port == 51821
        assert peers_by_subnet(state6) == {subnet6(n): key_of[n.ip6] for n in (n2, n3)}
        assert {p.endpoint for p in state6.peers.values()} == {
            (IPv6Address(n.ip6), 51821) for n in (n2, n3)
        }
        pattern = b"flannel-wg6-secret-" + secrets.token_hex(8).encode()
        c2 = n2.containers[0]
        capture = in_ns(c, lab.switch_ns, CAPTURE, "6", pattern.hex(), "51821")
        listener = in_ns(c, c2.ns, LISTENER, "5", "6")
        lab.run(n1.containers[0].ns, sys.executable, "-c", SENDER, c2.ip6, pattern.hex(), "50")
        got = finish(listener)
        seen = json.loads(finish(capture)[-1])
        assert sum(bytes.fromhex(d) == pattern for d in got) >= 45
        assert seen["wireguard"] >= 45 and seen["pattern"] == 0, seen
