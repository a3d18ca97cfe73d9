"""udp end to end: three lab nodes, real agents, real etcd, real packets through flannel0.

These tests are about the userspace datapath (trains, checksum offload, capabilities, its
counters, its thread's survival), which is what runs on kernels without BPF: every agent here
runs with FLANNELD_UDP_KERNEL=false, or the kernel fast path would carry the traffic instead.
The fast path has its own tests in test_udp_kernel.py.

n3 runs as the reference flanneld does (FLANNELD_UDP_OFFLOAD=false: plain TUN, one packet per
datagram, a lease record with PublicIP only), so n1 and n2 must talk to it without their
offloads while using them between themselves.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from deploy.lab import Lab, Node, signal_group

from .cluster import PREFIX, Cluster, need_lab, wait_until

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}
USERSPACE = {"FLANNELD_UDP_KERNEL": "false"}  # the userspace datapath under test (module doc)
REFERENCE_STYLE = {**USERSPACE, "FLANNELD_UDP_OFFLOAD": "false"}

ECHO_SERVER = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 7000))
srv.listen(16)
srv.settimeout(60)
def echo(c):
    with c:
        c.settimeout(10)
        while data := c.recv(65536):
            c.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

ECHO_CLIENT = r"""
import os, socket, sys, threading
data = os.urandom(int(sys.argv[2]))
c = socket.create_connection((sys.argv[1], 7000), timeout=10)
def send():
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
threading.Thread(target=send, daemon=True).start()
got = bytearray()
while chunk := c.recv(65536):
    got += chunk
print("ok" if got == data else f"mismatch: sent {len(data)}, got {len(got)}")
"""

UDP_LISTENER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
print("listening", flush=True)
end = time.monotonic() + float(sys.argv[1])
while (left := end - time.monotonic()) > 0:
    s.settimeout(left)
    try:
        print(s.recv(2048).decode(errors="replace"), flush=True)
    except TimeoutError:
        break
"""


def udp_listener(lab, ns: str, name: str, seconds: float = 3):
    """UDP_LISTENER started in `ns` for `seconds` and listening: its process and its log
    (each datagram it gets, a line)."""
    log = lab.workdir / f"{name}.log"
    proc = lab.spawn(ns, sys.executable, "-c", UDP_LISTENER, str(seconds), log=log)
    wait_until(lambda: "listening" in log.read_text(), 5, what="the UDP listener")
    return proc, log


SPOOFER = r"""
import socket, struct, sys
node, src, dst, sport = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
payload = b"spoof"
udp = struct.pack("!HHHH", 4000, 9999, 8 + len(payload), 0) + payload
hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                            socket.inet_aton(src), socket.inet_aton(dst)))
words = struct.unpack("!10H", hdr)
total = sum(words)
while total >> 16:
    total = (total & 0xFFFF) + (total >> 16)
hdr[10:12] = struct.pack("!H", ~total & 0xFFFF)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
for _ in range(5):
    s.sendto(bytes(hdr) + udp, (node, 8285))
"""


@pytest.fixture(scope="module")
def cluster():
    need_lab()
    with Lab(nodes=3, containers=1) as lab:
        lab.start_etcd()
        c = Cluster(
            lab, CONFIG, ("--reconcile-interval=1", "--healthz-ip=127.0.0.1", "--healthz-port=8471")
        )
        n1, n2, n3 = lab.nodes
        c.start(n1, env=USERSPACE)
        c.start(n2, env=USERSPACE)
        c.start(n3, env=REFERENCE_STYLE)
        for node in lab.nodes:
            c.wait_ready(node)
        for node in lab.nodes:
            for ct in node.containers:
                lab.spawn(ct.ns, sys.executable, "-c", ECHO_SERVER)
        yield c


def subnet_of(c: Cluster, node: Node) -> str:
    return c.env(node)["FLANNEL_SUBNET"].replace(".1/", ".0/")


def tcp_echo(c: Cluster, src: Node, dst: Node, size: int) -> str:
    res = c.lab.run(
        src.containers[0].ns,
        sys.executable,
        "-c",
        ECHO_CLIENT,
        dst.containers[0].ip,
        str(size),
        check=False,
        timeout=20,
    )
    return res.stdout.strip() or res.stderr.strip()[-300:]


def test_devices_routes_and_lease_records(cluster):
    lab = cluster.lab
    for node in lab.nodes:
        [link] = json.loads(lab.run(node.ns, "ip", "-j", "-d", "link", "show", "flannel0").stdout)
        assert link["mtu"] == 1472
        assert cluster.env(node)["FLANNEL_MTU"] == "1472"
        [addr] = json.loads(lab.run(node.ns, "ip", "-j", "addr", "show", "flannel0").stdout)
        network = subnet_of(cluster, node).split("/")[0]
        assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [(network, 32)]
        ours = [r for r in cluster.routes(node) if r.get("protocol") in (155, "155")]
        assert [(r["dst"], r["dev"]) for r in ours] == [("10.244.0.0/16", "flannel0")]
    records = {}
    for node in lab.nodes:
        key = f"{PREFIX}/subnets/{subnet_of(cluster, node).replace('/', '-')}"
        records[node.name] = lab.etcdctl("get", "--print-value-only", key).strip()
    n3_ip = lab.nodes[2].ip
    assert records["n3"] == f'{{"PublicIP":"{n3_ip}","PublicIPv6":null}}'  # the reference's
    for name in ("n1", "n2"):
        doc = json.loads(records[name])
        assert doc["BackendData"] == {"Cap": ["csum", "train"]} and "BackendType" not in doc


def test_icmp_and_tcp_between_all_containers(cluster):
    cluster.assert_all_reachable()
    nodes = cluster.lab.nodes
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                assert tcp_echo(cluster, src, dst, 300_000) == "ok", f"{src.name}->{dst.name}"


def udp_metric(c: Cluster, node: Node, name: str) -> float:
    lines = [x for x in c.http_get(node, "/metrics", 8471)[1].splitlines() if x.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_capable_nodes_send_super_packets_as_trains_and_others_get_packets(cluster):
    n1, n2, n3 = cluster.lab.nodes
    trains = 'flannel_udp_trains_total{direction="%s"}'
    before = [udp_metric(cluster, n, trains % d) for n, d in ((n1, "out"), (n2, "in"))]
    assert tcp_echo(cluster, n1, n2, 4_000_000) == "ok"  # echoed back: both ways
    after = [udp_metric(cluster, n, trains % d) for n, d in ((n1, "out"), (n2, "in"))]
    assert after[0] > before[0] and after[1] > before[1]
    assert udp_metric(cluster, n2, trains % "out") > 0  # the echo went back as trains too
    n3_in = udp_metric(cluster, n3, trains % "in")
    assert tcp_echo(cluster, n1, n3, 4_000_000) == "ok"
    assert udp_metric(cluster, n3, trains % "in") == n3_in == 0  # n3 writes as the reference
    assert udp_metric(cluster, n2, 'flannel_udp_drops_total{reason="bad_train"}') == 0


def test_reference_style_node_moves_bulk_tcp_both_ways(cluster):
    n1, _, n3 = cluster.lab.nodes
    assert tcp_echo(cluster, n1, n3, 4_000_000) == "ok"
    assert tcp_echo(cluster, n3, n1, 4_000_000) == "ok"


def test_tcp_without_timestamps_is_cut_for_its_own_header_size(cluster):
    """40-byte TCP/IP headers: cut for their own size, and the receive layout (made for 52)
    follows them."""
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    for node in (n1, n2):
        lab.run(node.containers[0].ns, "sysctl", "-q", "-w", "net.ipv4.tcp_timestamps=0")
    try:
        assert tcp_echo(cluster, n1, n2, 4_000_000) == "ok"
    finally:
        for node in (n1, n2):
            lab.run(node.containers[0].ns, "sysctl", "-q", "-w", "net.ipv4.tcp_timestamps=1")


def test_spoofed_datagrams_reach_no_container(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    c1, c2 = n1.containers[0], n2.containers[0]
    listener, log = udp_listener(lab, c1.ns, "udp-listener")
    send_real = "import socket, sys; socket.socket(2, 2).sendto(b'real', (sys.argv[1], 9999))"
    lab.run(c2.ns, sys.executable, "-c", send_real, c1.ip)
    # not a peer: the switch's own address (etcd's host)
    lab.run(lab.switch_ns, sys.executable, "-c", SPOOFER, n1.ip, c2.ip, c1.ip, "8285")
    # a peer's address, but not the backend's port
    lab.run(n2.ns, sys.executable, "-c", SPOOFER, n1.ip, c2.ip, c1.ip, "40000")
    listener.wait(10)
    got = log.read_text().split()
    assert "real" in got and "spoof" not in got

    def counted() -> bool:
        drops = 'flannel_udp_drops_total{reason="%s"}'
        return (
            udp_metric(cluster, n1, drops % "unknown_sender") >= 5
            and udp_metric(cluster, n1, drops % "bad_sender_port") >= 5
        )

    wait_until(counted, 5, what="the spoofed datagrams counted in n1's metrics")
    text = cluster.http_get(n1, "/metrics", 8471)[1]
    for direction in ("in", "out"):
        line = next(
            x
            for x in text.splitlines()
            if x.startswith(f'flannel_udp_packets_total{{direction="{direction}"}}')
        )
        assert float(line.rsplit(" ", 1)[1]) > 0


def flannel0_index(c: Cluster, node: Node) -> int:
    [link] = json.loads(c.lab.run(node.ns, "ip", "-j", "link", "show", "flannel0").stdout)
    return link["ifindex"]


def test_tiny_pings_during_a_bulk_stream_leave_the_datapath_alive(cluster):
    """Issue 12, 3: while a TCP bulk stream runs from n3's container to n1's, the same container
    sends `ping -s 0` (28-byte IPv4 packets) to n1's. n3 runs as the reference does (one packet
    per datagram), so n1's datapath joins n3's TCP segments into runs, and a tiny packet right
    behind a segment that opened one raised IndexError and ended the thread. In the bulk
    stream every burst of segments ends with PSH (which opens no run) and the pings slip in
    between bursts, so n1's agent is paused for half a second meanwhile: n3's TCP then sends
    lone probe and retransmitted segments among the pings, which n1 finds queued when it goes
    on. Afterwards n1's flannel0 is the same device (a dead datapath is healed by re-creating
    it), no internal error was counted, the stream arrived whole, and a normal ping answers."""
    lab = cluster.lab
    n1, _, n3 = lab.nodes
    internal = 'flannel_udp_drops_total{reason="internal"}'
    bytes_in = 'flannel_udp_bytes_total{direction="in"}'
    index, start = flannel0_index(cluster, n1), udp_metric(cluster, n1, bytes_in)
    src_ns, dst_ip = n3.containers[0].ns, n1.containers[0].ip
    bulk_log, ping_log = lab.workdir / "bulk-n3-n1.log", lab.workdir / "tiny-pings.log"
    bulk = lab.spawn(src_ns, sys.executable, "-c", ECHO_CLIENT, dst_ip, "40000000", log=bulk_log)
    agent, pings = cluster.procs[n1.name], None
    try:
        wait_until(
            lambda: udp_metric(cluster, n1, bytes_in) > start + 2_000_000,
            10,
            what="the bulk stream under way",
        )
        signal_group(agent, signal.SIGSTOP)
        pings = lab.spawn(
            src_ns, "ping", "-n", "-q", "-s", "0", "-c", "25", "-i", "0.02", "-W", "1", dst_ip,
            log=ping_log,
        )  # fmt: skip
        time.sleep(0.55)
        signal_group(agent, signal.SIGCONT)
        pings.wait(10)
        bulk.wait(60)
    finally:
        signal_group(agent, signal.SIGCONT)
        for proc in (bulk, pings):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert "25 packets transmitted" in ping_log.read_text()
    assert bulk_log.read_text().strip() == "ok"
    assert lab.ping(src_ns, dst_ip, count=3, timeout=1.0)
    time.sleep(2.5)  # a dead datapath is healed by the next reconcile (every second)
    assert udp_metric(cluster, n1, internal) == 0
    assert flannel0_index(cluster, n1) == index


def repaired_routes(c: Cluster, node: Node) -> float:
    name = 'flannel_entries_total{kind="route",op="repaired"}'
    lines = [x for x in c.http_get(node, "/metrics", 8471)[1].splitlines() if x.startswith(name)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


def test_hand_deleted_network_route_is_restored_and_counted(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    before = repaired_routes(cluster, n1)
    lab.run(n1.ns, "ip", "route", "del", "10.244.0.0/16", "dev", "flannel0")
    wait_until(
        lambda: lab.ping(n1.containers[0].ns, n2.containers[0].ip, timeout=0.3),
        5,
        what="traffic through the restored route",
    )
    wait_until(lambda: repaired_routes(cluster, n1) == before + 1, 5, what="the repair counted")


def test_hand_deleted_flannel0_is_recreated(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    recreations = "flannel_udp_device_recreations_total"
    before = udp_metric(cluster, n2, recreations)
    packets_in = 'flannel_udp_packets_total{direction="in"}'
    counted = udp_metric(cluster, n2, packets_in)
    lab.run(n2.ns, "ip", "link", "del", "flannel0")
    wait_until(
        lambda: lab.ping(n1.containers[0].ns, n2.containers[0].ip, timeout=0.3),
        5,
        what="traffic through a re-created flannel0",
    )
    assert udp_metric(cluster, n2, recreations) == before + 1
    assert udp_metric(cluster, n2, packets_in) > counted  # a counter: never back to zero


def test_stop_removes_flannel0_and_restart_restores_traffic_within_1s(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    before = cluster.env(n2)["FLANNEL_SUBNET"]
    took = cluster.stop(n2)
    assert took < 2, f"SIGTERM took {took:.2f} s"
    gone = lab.run(n2.ns, "ip", "link", "show", "flannel0", check=False)
    assert gone.returncode != 0 and "does not exist" in gone.stderr
    assert not any(r["dst"] == "10.244.0.0/16" for r in cluster.routes(n2))
    assert not lab.ping(n1.containers[0].ns, n2.containers[0].ip, timeout=0.3)
    probe = lab.reach_probe(n1.containers[0].ns, n2.containers[0].ip, 20, 0.03)
    cluster.subnet_file(n2).unlink()  # ready = subnet.env written again
    cluster.start(n2, env=USERSPACE)
    env = cluster.wait_ready(n2)
    # subnet.env's mtime is wall-clock time; the probe reports monotonic time
    ready = cluster.subnet_file(n2).stat().st_mtime - (time.time() - time.monotonic())
    assert env["FLANNEL_SUBNET"] == before
    first = lab.reach_result(probe, 25)
    assert first is not None, "traffic never came back"
    assert first - ready < 1.0, f"traffic back {first - ready:.2f} s after ready"
    cluster.assert_all_reachable()
