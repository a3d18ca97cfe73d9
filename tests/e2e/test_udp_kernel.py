"""udp with the kernel (tc eBPF) fast path, end to end: three lab nodes, real agents, real
etcd. The fast path is on by default; tests/e2e/test_udp.py runs its agents with
FLANNELD_UDP_KERNEL=false for the userspace datapath's own features.

Every test leaves the three agents running with the fast path (the mixed-pair test restores
n3), so the module's tests may run in any subset.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest

from deploy.lab import SEG1_GATEWAY, Lab, Node

from .cluster import PREFIX, Cluster, need_lab, sample, wait_until
from .test_udp import ECHO_SERVER, tcp_echo, udp_listener

CONFIG = {"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}
PORT = 8473
USERSPACE = {"FLANNELD_UDP_KERNEL": "false"}
KERNEL_LINE = "udp datapath: kernel (tc eBPF) on flannel0/eth0, userspace fallback for the rest"

# a whole flannel datagram with a raw socket: outer <sender>:<sport> -> <node>:8285, holding an
# inner UDP packet <src> -> <dst>:9999 saying `word`
RAW_SENDER = r"""
import socket, struct, sys
sender, node, sport, src, dst, word = sys.argv[1:7]
def csum(h):
    t = sum(struct.unpack("!%dH" % (len(h) // 2), h))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
def ipv4(src, dst, proto, body):
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, 0, 64, proto, 0,
                              socket.inet_aton(src), socket.inet_aton(dst)))
    h[10:12] = struct.pack("!H", csum(bytes(h)))
    return bytes(h) + body
payload = word.encode()
inner = ipv4(src, dst, 17, struct.pack("!HHHH", 4000, 9999, 8 + len(payload), 0) + payload)
outer = ipv4(sender, node, 17, struct.pack("!HHHH", int(sport), 8285, 8 + len(inner), 0) + inner)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5):
    s.sendto(outer, (node, 0))
"""


@pytest.fixture(scope="module")
def cluster():
    need_lab()
    with Lab(nodes=3, containers=1) as lab:
        lab.start_etcd()
        c = Cluster(
            lab,
            CONFIG,
            ("--reconcile-interval=1", "--healthz-ip=127.0.0.1", f"--healthz-port={PORT}"),
        )
        for node in lab.nodes:
            c.start(node)
        for node in lab.nodes:
            c.wait_ready(node)
        for node in lab.nodes:
            lab.spawn(node.containers[0].ns, sys.executable, "-c", ECHO_SERVER)
        yield c


def metrics(c: Cluster, node: Node) -> str:
    return c.http_get(node, "/metrics", PORT)[1]


def kernel(c: Cluster, node: Node, name: str) -> float:
    return sample(metrics(c, node), f"flannel_udp_kernel_{name}_total")


def userspace_packets(c: Cluster, node: Node) -> float:
    text = metrics(c, node)
    name = "flannel_udp_packets_total"
    return sample(text, name, direction="in") + sample(text, name, direction="out")


def drops(c: Cluster, node: Node, reason: str) -> float:
    return sample(metrics(c, node), "flannel_udp_drops_total", reason=reason)


def ingress_filters(c: Cluster, node: Node) -> str:
    return c.lab.run(node.ns, "tc", "filter", "show", "dev", "eth0", "ingress").stdout


def subnet_key(c: Cluster, node: Node) -> str:
    subnet = c.env(node)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    return f"{PREFIX}/subnets/{subnet.replace('/', '-')}"


def start_ready(c: Cluster, node: Node, env: dict[str, str] | None = None) -> None:
    """Start the node's agent and wait for it; its container is made anew then (the lab
    re-attaches containers), so it gets its echo server again."""
    c.subnet_file(node).unlink(missing_ok=True)
    c.start(node, env=env)
    c.wait_ready(node)
    c.lab.spawn(node.containers[0].ns, sys.executable, "-c", ECHO_SERVER)


def restart(c: Cluster, node: Node, env: dict[str, str] | None = None) -> None:
    c.stop(node)
    start_ready(c, node, env)


def test_fast_path_is_chosen_with_one_log_line_and_no_capability_advertised(cluster):
    """No `Cap` (peers send plain datagrams), and `Datapath: kernel` (peers' fast paths may
    send to it from their kernel)."""
    lab = cluster.lab
    for node in lab.nodes:
        assert cluster.log(node).count("udp datapath:") == 1
        assert KERNEL_LINE in cluster.log(node)
        assert "flannel_udp_in" in ingress_filters(cluster, node)
        record = json.loads(lab.etcdctl("get", "--print-value-only", subnet_key(cluster, node)))
        assert record["BackendData"] == {"Datapath": "kernel"}


def test_ping_matrix_and_tcp_go_through_the_kernel_not_userspace(cluster):
    cluster.assert_all_reachable()
    nodes = cluster.lab.nodes
    before = {n.name: (kernel(cluster, n, "encapsulated"), kernel(cluster, n, "decapsulated"),
                       userspace_packets(cluster, n)) for n in nodes}  # fmt: skip
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                ok = cluster.lab.ping(src.containers[0].ns, dst.containers[0].ip, count=10)
                assert ok, f"{src.name}->{dst.name}"
    for n in nodes:
        enc, dec, user = before[n.name]
        assert kernel(cluster, n, "encapsulated") >= enc + 40, n.name  # 2 peers x 10 x 2
        assert kernel(cluster, n, "decapsulated") >= dec + 40, n.name
        assert userspace_packets(cluster, n) - user <= 2, n.name


def test_bulk_tcp_between_all_containers_goes_through_the_kernel(cluster):
    """TCP super-packets (GSO) are encapsulated whole and decapsulated whole."""
    nodes = cluster.lab.nodes
    before = {n.name: (kernel(cluster, n, "encapsulated"), userspace_packets(cluster, n))
              for n in nodes}  # fmt: skip
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                assert tcp_echo(cluster, src, dst, 4_000_000) == "ok", f"{src.name}->{dst.name}"
    for n in nodes:
        enc, user = before[n.name]
        assert kernel(cluster, n, "encapsulated") > enc + 100, n.name
        assert userspace_packets(cluster, n) - user <= 10, n.name


def test_spoofed_and_stranger_datagrams_fall_to_userspace_and_are_counted(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    c1, c2 = n1.containers[0], n2.containers[0]
    listener, log = udp_listener(lab, c1.ns, "kernel-udp-listener")
    spoofed, stranger = drops(cluster, n1, "spoofed_source"), drops(cluster, n1, "unknown_sender")
    fallbacks = kernel(cluster, n1, "ingress_fallbacks")
    decapped = kernel(cluster, n1, "decapsulated")
    # control: a well-formed datagram from the peer n2, inner source in n2's subnet
    lab.run(n2.ns, sys.executable, "-c", RAW_SENDER, n2.ip, n1.ip, "8285", c2.ip, c1.ip, "real")
    # the peer n2, but an inner source outside n2's subnet
    lab.run(n2.ns, sys.executable, "-c", RAW_SENDER, n2.ip, n1.ip, "8285", "10.244.250.9", c1.ip,
            "spoof")  # fmt: skip
    # not a peer: the switch's own address (etcd's host)
    send_stranger = (sys.executable, "-c", RAW_SENDER, SEG1_GATEWAY, n1.ip, "8285", c2.ip, c1.ip)
    lab.run(lab.switch_ns, *send_stranger, "stranger")
    listener.wait(10)
    got = log.read_text().split()
    assert "real" in got and "spoof" not in got and "stranger" not in got
    wait_until(
        lambda: (
            drops(cluster, n1, "spoofed_source") >= spoofed + 5
            and drops(cluster, n1, "unknown_sender") >= stranger + 5
        ),
        5,
        what="the refused datagrams counted by userspace",
    )
    assert kernel(cluster, n1, "ingress_fallbacks") >= fallbacks + 10
    assert kernel(cluster, n1, "decapsulated") >= decapped + 5  # the real ones


def test_hand_deleted_flannel0_is_healed_and_the_fast_path_reattached(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    recreations = sample(metrics(cluster, n2), "flannel_udp_device_recreations_total")
    lab.run(n2.ns, "ip", "link", "del", "flannel0")
    wait_until(
        lambda: lab.ping(n1.containers[0].ns, n2.containers[0].ip, timeout=0.3),
        5,
        what="traffic through a re-created flannel0",
    )
    assert sample(metrics(cluster, n2), "flannel_udp_device_recreations_total") == recreations + 1
    filters = lab.run(n2.ns, "tc", "filter", "show", "dev", "flannel0", "egress").stdout
    assert "flannel_udp_out" in filters
    enc, dec = kernel(cluster, n2, "encapsulated"), kernel(cluster, n2, "decapsulated")
    user = userspace_packets(cluster, n2)
    assert lab.ping(n1.containers[0].ns, n2.containers[0].ip, count=5)
    assert kernel(cluster, n2, "encapsulated") >= enc + 5
    assert kernel(cluster, n2, "decapsulated") >= dec + 5
    assert userspace_packets(cluster, n2) - user <= 2


def test_peer_removed_from_etcd_leaves_the_fast_path(cluster):
    lab = cluster.lab
    n1, _, n3 = lab.nodes
    key = subnet_key(cluster, n3)
    cluster.stop(n3)  # its lease stays until deleted by hand
    try:
        misses, no_peer = kernel(cluster, n1, "egress_misses"), drops(cluster, n1, "no_peer")
        lab.etcdctl("del", key)
        wait_until(
            lambda: (
                not lab.ping(n1.containers[0].ns, n3.containers[0].ip, timeout=0.3)
                and kernel(cluster, n1, "egress_misses") > misses
            ),
            10,
            what="n3's route out of n1's fast path",
        )
        assert drops(cluster, n1, "no_peer") > no_peer  # userspace answered: net unreachable
    finally:
        start_ready(cluster, n3)
    cluster.assert_all_reachable()


def test_kernel_off_and_a_mixed_pair(cluster):
    """n3 with FLANNELD_UDP_KERNEL=false runs the userspace path (no kernel counters, its
    capabilities advertised); n1 (fast path) and n3 ping and move TCP both ways: n1's kernel
    takes what n3 sends, and leaves what goes to n3 to n1's userspace, which finishes the
    checksums a veth underlay leaves unfinished (see kplan)."""
    lab = cluster.lab
    n1, _, n3 = lab.nodes
    restart(cluster, n3, USERSPACE)
    try:
        log = cluster.log(n3)
        assert "udp datapath: userspace (FLANNELD_UDP_KERNEL=false)" in log
        assert "flannel_udp_kernel_" not in metrics(cluster, n3)
        assert "flannel_udp_in" not in ingress_filters(cluster, n3)
        record = json.loads(lab.etcdctl("get", "--print-value-only", subnet_key(cluster, n3)))
        assert record["BackendData"] == {"Cap": ["csum", "train"]}
        to_user = kernel(cluster, n1, "egress_userspace_peers")
        dec = kernel(cluster, n1, "decapsulated")
        user = userspace_packets(cluster, n3)
        c1, c3 = n1.containers[0], n3.containers[0]
        wait_until(lambda: lab.ping(c1.ns, c3.ip, timeout=0.5), 10, what="n1 -> n3")
        assert lab.ping(c1.ns, c3.ip, count=5)
        assert lab.ping(c3.ns, c1.ip, count=5)
        assert kernel(cluster, n1, "egress_userspace_peers") >= to_user + 10
        assert kernel(cluster, n1, "decapsulated") >= dec + 10
        assert userspace_packets(cluster, n3) >= user + 20
        assert tcp_echo(cluster, n1, n3, 4_000_000) == "ok"
        assert tcp_echo(cluster, n3, n1, 4_000_000) == "ok"
    finally:
        restart(cluster, n3)
    assert KERNEL_LINE in cluster.log(n3)


def test_stop_removes_the_ingress_filter_and_a_killed_agents_is_replaced(cluster):
    lab = cluster.lab
    n1, n2, _ = lab.nodes
    cluster.stop(n2)
    assert "flannel_udp_in" not in ingress_filters(cluster, n2)
    start_ready(cluster, n2)
    assert "flannel_udp_in" in ingress_filters(cluster, n2)
    for _ in range(2):
        cluster.stop(n2, signal.SIGKILL)
        assert "flannel_udp_in" in ingress_filters(cluster, n2)  # stale: nobody removed it
        start_ready(cluster, n2)
        assert ingress_filters(cluster, n2).count("flannel_udp_in") == 1  # replaced
    cluster.assert_all_reachable()
    # a killed agent's filter is removed by `flannelctl cleanup` too
    cluster.stop(n2, signal.SIGKILL)
    out = lab.run(n2.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup").stdout
    assert "removed tc ingress filter flannel_udp_in on eth0" in out
    assert "flannel_udp_in" not in ingress_filters(cluster, n2)
    start_ready(cluster, n2)
    cluster.assert_all_reachable()
    enc = kernel(cluster, n2, "encapsulated")
    assert lab.ping(n2.containers[0].ns, n1.containers[0].ip, count=3)
    assert kernel(cluster, n2, "encapsulated") >= enc + 3


def test_another_port_is_used_on_the_wire_both_ways():
    """Backend Port 9285: the fast path encapsulates to it and from it, and admits it."""
    need_lab()
    config = {"Network": "10.245.0.0/16", "Backend": {"Type": "udp", "Port": 9285}}
    with Lab(nodes=2, containers=1) as lab:
        lab.start_etcd()
        c = Cluster(lab, config, ("--reconcile-interval=1", "--healthz-ip=127.0.0.1",
                                  f"--healthz-port={PORT}"))  # fmt: skip
        c.start_all()
        n1, n2 = lab.nodes
        dump = lab.spawn(
            lab.switch_ns, "tcpdump", "-n", "-l", "-c", "4", "-i", "br0", "udp port 9285",
            log=lab.workdir / "tcpdump.log",
        )  # fmt: skip
        try:
            c.assert_all_reachable()
            assert lab.ping(n1.containers[0].ns, n2.containers[0].ip, count=5)
            dump.wait(10)
        finally:
            if dump.poll() is None:
                dump.kill()
        for node in (n1, n2):
            assert kernel(c, node, "encapsulated") >= 5
            assert kernel(c, node, "decapsulated") >= 5
            assert userspace_packets(c, node) <= 2
        wire = (lab.workdir / "tcpdump.log").read_text()
        assert f"{n1.ip}.9285 > {n2.ip}.9285" in wire or f"{n2.ip}.9285 > {n1.ip}.9285" in wire
