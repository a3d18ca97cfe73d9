"""The backend benchmark: the figures to choose a backend by, measured in the namespace lab.

Run it through `deploy/benchmark.sh` (installs iperf3 and matplotlib) as root.

Data path. One lab per backend (3 nodes, 1 container each, the agent on nodes 1 and 2; node
3 is the joining node). For the bare underlay (node 1 to node 2 over eth0: no encapsulation,
no container hop; the physical limit of this machine) and for every registered backend
(container on node 1 to container on node 2), interleaved round by round (underlay, host-gw,
vxlan, udp, underlay, ...):
- TCP throughput with iperf3, 1 stream and 4 streams;
- request/response latency: 64-byte messages echoed back and forth on one TCP connection,
  each round trip timed; p50 and p99 (idle `ping` would overstate a userspace datapath);
- the agents' CPU (utime+stime from /proc, % of one core) on the sending and the receiving
  node during the 1-stream run, and the sending node's agent memory (VmRSS);
- join-to-reachable: the agent starts on node 3 (its containers already on cni0, its kernel
  wiped of the agent's state, its old lease deleted); the time from its lease key appearing
  in etcd to the first echo answered from its container to node 1's container.
The table gives medians over the rounds and each backend's ratio to the underlay.

Control-plane scale (`--scale 1000,5000`, the default; `--scale 0` skips it, `--scale-only`
skips the data path). For every backend and every N, a one-node lab: the agent runs (periodic
reconcile off), N synthetic peer leases like that backend's real ones are written into etcd
in batches (PublicIPs in 198.18.0.0/15, made on-link in the node by a route, so host-gw has N
distinct gateways). It measures the time until the agent has logged every peer and until
every route/FDB/ARP entry is in the node's kernel; the agent's memory; the CPU time of one
full reconcile with nothing to change (triggered by a change to a peer's record that no plan
looks at); the time from one more lease committed to its route in the kernel; and the time
until everything is gone again once the leases are revoked.

Output: a table on the terminal, `<out>/benchmark.json` (date, machine, settings, every raw
sample) and `<out>/benchmark.png` (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from ipaddress import IPv4Address, IPv4Network, ip_interface
from pathlib import Path
from typing import Any

import backends
from flanneld.core.lease import LeaseAttrs
from flanneld.core.schedule import FULL_PASS_SHARE
from flanneld.core.subnets import first_host, subnet_key
from flanneld.edges import subnetenv

from .cluster import PREFIX, AgentExited, Cluster, wait_until
from .demo import Progress, signals_interrupt, table_lines
from .lab import Lab, LabError, Node, etcd_tool, stop_process

NETWORK = "10.244.0.0/16"
UNDERLAY = "underlay"
HERE = Path(__file__).resolve().parent
PROBES = str(HERE / "probes.py")
IPERF_PORT = 5201
RR_PORT = 7007
RR_WARMUP = 200
JOIN_TIMEOUT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

SCALE_NETWORK = "10.0.0.0/8"
PEER_IPS = IPv4Network("198.18.0.0/15")  # synthetic peers' PublicIPs, on-link in the node
SCALE_RECONCILE = 5  # the scale agent's --reconcile-interval (full passes, timed via /metrics)
NOOP_PASSES = 3  # no-op reconciles timed per run, of each kind (the median is reported)
SCALE_HEALTHZ = 8471  # the scale agent's metrics port, on 127.0.0.1 inside its node
LEASE_TTL = 3600

Sample = dict[str, Any]


class BenchError(RuntimeError):
    """One measurement failed; the message says which and why."""


# What a failed measurement raises: it is recorded and the run goes on.
FAILURES = (
    BenchError,
    LabError,
    AgentExited,
    TimeoutError,
    OSError,
    ValueError,
    KeyError,
    subprocess.SubprocessError,
)


# -- the agent's process, from /proc -----------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads) in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    meminfo = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "memory_gib": round(int(meminfo.group(1)) / 2**20, 1) if meminfo else None,
        "python": platform.python_version(),
        "iperf3": subprocess.run(
            ["iperf3", "--version"], capture_output=True, text=True, timeout=10
        ).stdout.split("\n")[0],
    }


# -- statistics (pure) -------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


METRICS = (
    "gbps_1",
    "gbps_4",
    "p50_us",
    "p99_us",
    "cpu_src_pct_1",
    "cpu_dst_pct_1",
    "rss_mb",
    "join_ms",
)


def summarise(samples: list[Sample], datapaths: list[str]) -> dict[str, dict[str, float | None]]:
    """Per datapath: the median of each metric over the rounds, and the ratios of throughput
    and p50 latency to the underlay's medians."""
    out: dict[str, dict[str, float | None]] = {}
    for dp in datapaths:
        runs = [s for s in samples if s["datapath"] == dp]
        out[dp] = {m: median([s.get(m) for s in runs]) for m in METRICS}
        out[dp]["rounds"] = len(runs)
    base = out.get(UNDERLAY, {})
    for row in out.values():
        for m in ("gbps_1", "gbps_4", "p50_us"):
            row[f"{m}_ratio"] = ratio(row[m], base.get(m))
    return out


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(summary: dict[str, dict[str, float | None]], rounds: int) -> str:
    rows = [
        [
            "datapath",
            "Gbit/s 1 str",
            "4 str",
            "× underlay",
            "RTT p50 µs",
            "p99 µs",
            "× underlay",
            "agent CPU %",
            "agent RSS MB",
            "join→reach ms",
        ]
    ]
    for dp, r in summary.items():
        cpu = (
            f"{_num(r['cpu_src_pct_1'], '.0f')}/{_num(r['cpu_dst_pct_1'], '.0f')}"
            if r["cpu_src_pct_1"] is not None
            else "-"
        )
        rows.append(
            [
                dp + ("*" if dp == UNDERLAY else ""),
                _num(r["gbps_1"], ".2f"),
                _num(r["gbps_4"], ".2f"),
                f"{_num(r['gbps_1_ratio'], '.2f')}/{_num(r['gbps_4_ratio'], '.2f')}",
                _num(r["p50_us"], ".0f"),
                _num(r["p99_us"], ".0f"),
                _num(r["p50_us_ratio"], ".2f"),
                cpu,
                _num(r["rss_mb"], ".1f"),
                _num(r["join_ms"], ".0f"),
            ]
        )
    notes = [
        "",
        f"  medians of {rounds} interleaved round(s); × underlay = backend median / underlay "
        "median (throughput 1/4 streams; p50 latency)",
        "  * underlay: node to node over eth0, no encapsulation and no container hop; the "
        "backends run container to container",
        "  agent CPU: % of one core, sending/receiving node's agent during the 1-stream run",
        "  join→reach: a new node's lease appearing in etcd → first echo answered from its "
        "container",
    ]
    return "\n".join(table_lines(rows) + notes)


def render_scale_table(results: list[Sample]) -> str:
    rows = [
        [
            "backend",
            "peers",
            "write s",
            "all seen s",
            "in kernel s",
            "agent RSS MB",
            "full pass ms",
            "event pass ms",
            "+1 peer ms",
            "all removed s",
        ]
    ]
    for r in results:
        kernel = "-" if not r["expected"] else _num(r["kernel_s"], ".2f")
        if r["expected"] and not r["converged"]:
            kernel = f"NOT DONE {r['counts']}"
        rows.append(
            [
                r["backend"],
                str(r["peers"]),
                _num(r["write_s"], ".2f"),
                _num(r["seen_s"], ".2f"),
                kernel,
                f"{_num(r['rss_before_mb'], '.0f')}→{_num(r['rss_after_mb'], '.0f')}",
                _num(r["full_ms"], ".0f"),
                _num(r["noop_ms"], ".0f"),
                _num(r["one_more_ms"], ".0f"),
                _num(r["removed_s"], ".2f"),
            ]
        )
    notes = [
        "",
        "  s from the first lease write: all seen = every peer logged by the agent; in kernel = "
        "every route/FDB/ARP entry present (udp: nothing per peer in the kernel)",
        f"  with nothing to change (medians of {NOOP_PASSES}): full pass = wall time of a periodic "
        "reconcile (dumps the kernel), from the agent's metrics; event pass = agent CPU after a "
        "peer event (no dump)",
        "  +1 peer: one more lease in etcd → its route in the kernel",
        "  RSS: before the peers → with them; all removed: leases revoked → every entry gone",
    ]
    return "\n".join(table_lines(rows) + notes)


# -- data path measurements --------------------------------------------------------------------


@dataclass
class Pair:
    """Where one datapath's traffic runs: from `src` to `dst_ip` in `dst`, and the agents
    whose CPU counts."""

    name: str
    lab: Lab
    src: str
    dst: str
    dst_ip: str
    agents: tuple[int, int] | None  # pids of the sending and the receiving node's agents


def _wait_listening(lab: Lab, ns: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"the server in {ns} exited with status {proc.returncode}")
        out = lab.run(ns, "ss", "-Hltn", f"sport = :{port}", timeout=5).stdout
        return bool(out.strip())

    wait_until(listening, 5, step=0.02, what=f"a server listening on {ns}:{port}")


def iperf3(pair: Pair, streams: int, seconds: float) -> Sample:
    """One iperf3 run; Gbit/s received, retransmits, and the agents' CPU % meanwhile."""
    lab = pair.lab
    server = lab.spawn(
        pair.dst, "iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--rcv-timeout", "5000"
    )
    try:
        _wait_listening(lab, pair.dst, IPERF_PORT, server)
        cpu0 = [cpu_seconds(p) for p in pair.agents or ()]
        t0 = time.monotonic()
        res = lab.run(
            pair.src,
            "iperf3",
            "-c",
            pair.dst_ip,
            "-p",
            str(IPERF_PORT),
            "-t",
            f"{seconds:g}",
            "-P",
            str(streams),
            "-J",
            "--connect-timeout",
            "3000",
            check=False,
            timeout=seconds + 20,
        )
        elapsed = time.monotonic() - t0
        cpu = [
            100 * (cpu_seconds(p) - c) / elapsed
            for p, c in zip(pair.agents or (), cpu0, strict=True)
        ]
    finally:
        stop_process(server)
    try:
        doc = json.loads(res.stdout)
    except ValueError:
        raise BenchError(f"iperf3 printed no JSON: {res.stderr.strip()[:200]}") from None
    if "error" in doc:
        raise BenchError(f"iperf3: {doc['error']}")
    end = doc["end"]
    out: Sample = {
        "gbps": end["sum_received"]["bits_per_second"] / 1e9,
        "retransmits": end["sum_sent"].get("retransmits"),
    }
    if cpu:
        out["cpu_src_pct"], out["cpu_dst_pct"] = cpu
    return out


def request_response(pair: Pair, count: int) -> list[int]:
    """`count` timed round trips of a 64-byte message (after RR_WARMUP untimed); RTTs in ns."""
    lab = pair.lab
    server = lab.spawn(pair.dst, sys.executable, "-I", PROBES, "rr-server", "1", str(RR_PORT), "10")
    try:
        res = lab.run(
            pair.src,
            sys.executable,
            "-I",
            PROBES,
            "rr-client",
            "0",
            pair.dst_ip,
            str(RR_PORT),
            str(count),
            str(RR_WARMUP),
            "30",
            check=False,
            timeout=45,
        )
    finally:
        stop_process(server)
    if res.returncode != 0:
        raise BenchError(f"request/response client failed: {res.stderr.strip()[-300:]}")
    return json.loads(res.stdout)


# -- the labs ----------------------------------------------------------------------------------


class BackendLab:
    """A lab running one backend: agents on nodes 1 and 2, node 3 ready to join."""

    def __init__(self, backend: str, lab: Lab) -> None:
        self.backend = backend
        self.lab = lab
        self.n1, self.n2, self.n3 = lab.nodes
        self.cluster = Cluster(lab, {"Network": NETWORK, "Backend": {"Type": backend}})
        self.joiner_subnet = IPv4Network("0.0.0.0/32")  # chosen in start()

    def start(self) -> None:
        """Agents up on nodes 1 and 2, their containers reachable; node 3's containers on a
        cni0 with a subnet its agent will take (it is written into its subnet.env)."""
        for node in (self.n1, self.n2):
            self.cluster.start(node)
        envs = [self.cluster.wait_ready(node, timeout=30) for node in (self.n1, self.n2)]
        matrix = self.cluster.wait_reachable(15)
        if not all(matrix.values()):
            raise BenchError(f"{self.backend}: containers on nodes 1 and 2 do not reach each other")
        taken = {ip_interface(env["FLANNEL_SUBNET"]).network for env in envs}
        candidates = list(IPv4Network(NETWORK).subnets(new_prefix=24))[1:]  # from SubnetMin on
        self.joiner_subnet = next(s for s in candidates if s not in taken)
        mtu = int(envs[0]["FLANNEL_MTU"])
        text = subnetenv.render(IPv4Network(NETWORK), self.joiner_subnet, mtu, False)
        subnetenv.write(self.cluster.subnet_file(self.n3), text)
        self.lab.attach_containers(self.n3, first_host(self.joiner_subnet), mtu)

    def pair(self) -> Pair:
        pids = (self.cluster.procs["n1"].pid, self.cluster.procs["n2"].pid)
        c1, c2 = self.n1.containers[0], self.n2.containers[0]
        return Pair(self.backend, self.lab, c1.ns, c2.ns, c2.ip, pids)

    def underlay(self) -> Pair:
        return Pair(UNDERLAY, self.lab, self.n1.ns, self.n2.ns, self.n2.ip, None)

    @property
    def joiner_key(self) -> str:
        return f"{PREFIX}/subnets/{subnet_key(self.joiner_subnet)}"

    def _reset_joiner(self) -> None:
        """Node 3 as a new node: agent stopped, lease gone (and node 1 has dropped it), no
        state of the agent left in its kernel."""
        dst = str(self.joiner_subnet)
        line = f"peer {dst} removed"
        before = self.cluster.log(self.n1).count(line)
        if self.lab.etcdctl("del", self.joiner_key).strip() == "1":
            wait_until(
                lambda: (
                    self.cluster.log(self.n1).count(line) > before
                    and not self.lab.run(
                        self.n1.ns, "ip", "route", "show", dst, "proto", "155"
                    ).stdout.strip()
                ),
                10,
                what=f"node 1 dropping {dst}",
            )
        ns = self.n3.ns
        self.lab.run(ns, "ip", "route", "flush", "proto", "155")
        for link in json.loads(self.lab.run(ns, "ip", "-j", "link", "show").stdout):
            if link["ifname"].startswith("flannel"):
                self.lab.run(ns, "ip", "link", "del", link["ifname"], check=False)

    def join(self) -> Sample:
        """Start node 3's agent; ms from its key appearing in etcd to node 1's container
        getting an echo answered by node 3's container."""
        self._reset_joiner()
        src, dst = self.n1.containers[0], self.n3.containers[0]
        prober = self.lab.reach_probe(src.ns, dst.ip, JOIN_TIMEOUT, 0.005)
        try:
            with KeyWatch(self.lab, self.joiner_key) as watch:
                started = time.monotonic()
                self.cluster.start(self.n3)
                appeared = watch.wait(JOIN_TIMEOUT)
                answered = self.lab.reach_result(prober, JOIN_TIMEOUT + 5)
        finally:
            if prober.poll() is None:  # a failure before its result: it must not probe on
                stop_process(prober)
            if "n3" in self.cluster.procs:
                self.cluster.stop(self.n3)
        if answered is None:
            raise BenchError(
                f"{self.backend}: node 1's container got no answer from node 3's within "
                f"{JOIN_TIMEOUT:g} s of its start"
            )
        return {
            "join_ms": 1000 * (answered - appeared),
            "join_start_to_key_ms": 1000 * (appeared - started),
        }


class KeyWatch:
    """`etcdctl watch KEY` in the switch namespace; `wait()` returns the `time.monotonic()` at
    which the first PUT of the key arrived. The watch starts from the revision after the
    current one, so a PUT made before etcdctl is connected is not missed (only seen late)."""

    def __init__(self, lab: Lab, key: str) -> None:
        self.key = key
        revision = json.loads(lab.etcdctl("get", key, "-w", "json"))["header"]["revision"]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.switch_ns, etcd_tool("etcdctl")]
            + [f"--endpoints={lab.etcd_endpoint}", "watch", f"--rev={revision + 1}", key],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        self.at: float | None = None
        self._seen = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        put = False
        for line in self.proc.stdout:
            line = line.strip()
            if put and line == self.key:
                self.at = time.monotonic()
                self._seen.set()
                return
            put = line == "PUT"

    def wait(self, timeout: float) -> float:
        if not self._seen.wait(timeout) or self.at is None:
            raise BenchError(f"{self.key} did not appear in etcd within {timeout:g} s")
        return self.at

    def __enter__(self) -> KeyWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.proc)


# -- control-plane scale -----------------------------------------------------------------------


def synthetic_leases(backend: str, count: int, own: IPv4Network) -> list[tuple[str, LeaseAttrs]]:
    """`count` peers' (etcd key, record) in SCALE_NETWORK, skipping our own subnet; records as
    that backend's agent writes them, PublicIPs from PEER_IPS."""
    subnets = (
        s
        for s in IPv4Network(SCALE_NETWORK).subnets(new_prefix=24)
        if s.network_address.packed[1] and s != own
    )
    leases = []
    for i, subnet in zip(range(count), subnets, strict=False):
        ip = IPv4Address(int(PEER_IPS.network_address) + 1 + i)
        if backend == "vxlan":
            mac = "0e:53:" + ":".join(f"{(i >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))
            attrs = LeaseAttrs(ip, "vxlan", {"VNI": 1, "VtepMAC": mac})
        elif backend == "udp":
            attrs = LeaseAttrs(ip)  # the reference's udp record: PublicIP only
        else:
            attrs = LeaseAttrs(ip, backend)
        leases.append((f"{PREFIX}/subnets/{subnet_key(subnet)}", attrs))
    return leases


def expected_entries(backend: str, peers: int) -> dict[str, int]:
    """The per-peer kernel entries a backend programs (DESIGN.md); udp keeps its peers in the
    agent's own table."""
    per_peer = {"host-gw": ("route",), "vxlan": ("route", "fdb", "arp")}
    return {kind: peers for kind in per_peer.get(backend, ())}


def kernel_entries(lab: Lab, node: Node, kinds: list[str]) -> dict[str, int]:
    counts = {}
    for kind in kinds:
        if kind == "route":
            out = lab.run(node.ns, "ip", "route", "show", "proto", "155").stdout
            counts[kind] = len(out.splitlines())
        elif kind == "arp":
            cmd = ("ip", "neigh", "show", "dev", "flannel.1", "nud", "permanent")
            counts[kind] = len(lab.run(node.ns, *cmd, check=False).stdout.splitlines())
        else:
            out = lab.run(node.ns, "bridge", "fdb", "show", "dev", "flannel.1", check=False).stdout
            counts[kind] = sum(" dst " in line for line in out.splitlines())
    return counts


class LogCounter:
    """Counts lines containing `needle` appended to a growing log file."""

    def __init__(self, path: Path, needle: str) -> None:
        self.path, self.needle = path, needle
        self.offset, self.count = path.stat().st_size, 0

    def update(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        self.offset += end
        self.count += data[:end].count(self.needle.encode())
        return self.count


def _poll(until: Callable[[], bool], timeout: float, step: float = 0.1) -> float | None:
    """Call `until()` every `step` s; the monotonic time it first returned true, None after
    `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return time.monotonic()
        time.sleep(step)
    return None


def cpu_burst_ms(pid: int, trigger: Callable[[], object], quiet: float = 0.3) -> float:
    """The CPU time `pid` spends after `trigger()` until it has been idle for `quiet` s (at
    most 60 s); /proc counts in clock ticks (10 ms)."""
    before = last = cpu_seconds(pid)
    trigger()
    changed = time.monotonic()
    deadline = changed + 60
    while time.monotonic() - changed < quiet and time.monotonic() < deadline:
        time.sleep(0.02)
        now = cpu_seconds(pid)
        if now != last:
            last, changed = now, time.monotonic()
    return round(1000 * (last - before), 1)


class ScaleLab:
    """One node running `backend`'s agent in a lab whose etcd gets synthetic peers."""

    def __init__(self, lab: Lab, backend: str) -> None:
        self.lab, self.backend = lab, backend
        self.node = lab.nodes[0]
        lab.start_etcd()
        self.cluster = Cluster(
            lab,
            {"Network": SCALE_NETWORK, "Backend": {"Type": backend}},
            (
                f"--reconcile-interval={SCALE_RECONCILE}",
                "--healthz-ip=127.0.0.1",
                f"--healthz-port={SCALE_HEALTHZ}",
            ),
        )
        self.lease = 0  # the etcd lease all synthetic keys are attached to

    def start(self) -> tuple[int, IPv4Network]:
        """The agent running; its pid and subnet."""
        lab, node = self.lab, self.node
        lab.run(node.ns, "ip", "route", "add", str(PEER_IPS), "dev", node.iface, "scope", "link")
        self.cluster.start(node)
        env = self.cluster.wait_ready(node, timeout=30)
        return self.cluster.procs[node.name].pid, ip_interface(env["FLANNEL_SUBNET"]).network

    def put_all(self, leases: list[tuple[str, LeaseAttrs]]) -> tuple[float, float]:
        """Write the leases in batches under our etcd lease (granted by the first call); the
        monotonic times of the first write and of the last commit."""
        records = "".join(f"{key}\t{attrs.encode().decode()}\n" for key, attrs in leases)
        cmd = [sys.executable, "-I", PROBES, "put", self.lab.etcd_endpoint, str(LEASE_TTL)]
        if self.lease:
            cmd.append(str(self.lease))
        written = json.loads(
            self.lab.run(self.lab.switch_ns, *cmd, input=records, timeout=150).stdout
        )
        self.lease = written["lease"]
        return written["first"], written["last"]

    def put(self, key: str, attrs: LeaseAttrs) -> None:
        self.lab.etcdctl("put", f"--lease={self.lease:x}", key, attrs.encode().decode())

    def revoke(self) -> None:
        self.lab.etcdctl("lease", "revoke", f"{self.lease:x}")

    def metric(self, name: str, label: str = "") -> float:
        """One sample of the agent's /metrics (0 when absent)."""
        text = self.cluster.http_get(self.node, "/metrics", SCALE_HEALTHZ)[1]
        for line in text.splitlines():
            if line.startswith(name) and label in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def full_pass_ms(self) -> float | None:
        """Wall time of the next periodic (full) reconcile, from the agent's metrics. At
        scale the agent spaces full passes out (`full_pass_period`): up to a minute apart for
        a 3 s pass."""
        runs = 'flannel_reconcile_runs_total{mode="full"}'
        start = self.metric(runs)
        wait = SCALE_RECONCILE * 3 + 3 / FULL_PASS_SHARE
        if not _poll(lambda: self.metric(runs) > start, wait, 0.2):
            return None
        return 1000 * self.metric("flannel_reconcile_last_duration_seconds")

    def one_more_ms(self, key: str, attrs: LeaseAttrs) -> float | None:
        """ms from one more lease committed in etcd to its route in the kernel."""
        subnet = key.rsplit("/", 1)[1].replace("-", "/")
        _, committed = self.put_all([(key, attrs)])
        route = ("ip", "route", "show", subnet, "proto", "155")
        done = _poll(lambda: bool(self.lab.run(self.node.ns, *route).stdout.strip()), 30, 0.01)
        return 1000 * (done - committed) if done else None


def scale_run(backend: str, peers: int, timeout: float, prefix: str) -> Sample:
    """One agent, `peers` synthetic peers written at once: see the module docstring."""
    expected = expected_entries(backend, peers)
    kinds = sorted(expected)
    with Lab(nodes=1, containers=0, prefix=prefix) as lab:
        sl = ScaleLab(lab, backend)
        pid, own = sl.start()
        log = lab.workdir / f"{sl.node.name}.agent.log"
        added, removed = LogCounter(log, " added (public IP "), LogCounter(log, " removed (")
        rss_before = rss_mb(pid)
        *leases, extra = synthetic_leases(backend, peers + 1, own)
        first, last = sl.put_all(leases)
        counts: dict[str, int] = {}
        seen_at: float | None = None

        def converged() -> bool:
            nonlocal counts, seen_at
            if seen_at is None and added.update() >= peers:
                seen_at = time.monotonic()
            counts = kernel_entries(lab, sl.node, kinds)
            return seen_at is not None and counts == expected

        done_at = _poll(converged, timeout)
        time.sleep(0.5)  # the last log lines
        rss_after = rss_mb(pid)
        noop: list[float] = []
        full: list[float] = []
        if done_at:
            full = [ms for _ in range(NOOP_PASSES) if (ms := sl.full_pass_ms()) is not None]
            # A peer's record changes in a way no plan looks at: one event-triggered reconcile
            # that finds nothing to change in the kernel.
            key, attrs = leases[0]
            for k in range(NOOP_PASSES):
                changed = replace(attrs, backend_data={**(attrs.backend_data or {}), "Bench": k})
                noop.append(cpu_burst_ms(pid, partial(sl.put, key, changed)))
        one_more = sl.one_more_ms(*extra) if done_at and "route" in expected else None
        revoke_at = time.monotonic()
        sl.revoke()
        zero = dict.fromkeys(kinds, 0)
        gone_at = _poll(
            lambda: removed.update() >= peers and kernel_entries(lab, sl.node, kinds) == zero,
            timeout,
        )
        if sl.cluster.procs[sl.node.name].poll() is not None:
            raise AgentExited(f"the {backend} agent died:\n{sl.cluster.log(sl.node)[-2000:]}")
    return {
        "backend": backend,
        "peers": peers,
        "expected": expected,
        "counts": counts,
        "converged": done_at is not None,
        "write_s": last - first,
        "seen_s": seen_at - first if seen_at else None,
        "kernel_s": done_at - first if done_at else None,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "noop_cpu_ms": noop,
        "noop_ms": median(noop),
        "full_ms": median(full) if full else None,
        "one_more_ms": one_more,
        "removed_s": gone_at - revoke_at if gone_at else None,
    }


# -- the chart ---------------------------------------------------------------------------------


def chart(
    path: Path, samples: list[Sample], datapaths: list[str], scale: list[Sample], title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (4 if samples else 0) + (3 if scale else 0)
    rows = (panels + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.set_visible(False)

    def bars(ax: Any, names: list[str], metrics: list[tuple[str, str]], unit: str) -> None:
        width = 0.8 / len(metrics)
        for k, (metric, label) in enumerate(metrics):
            xs, meds, lo, hi = [], [], [], []
            for i, name in enumerate(names):
                values = [
                    s[metric]
                    for s in samples
                    if s["datapath"] == name and s.get(metric) is not None
                ]
                if values:
                    m = statistics.median(values)
                    xs.append(i + (k - (len(metrics) - 1) / 2) * width)
                    meds.append(m)
                    lo.append(m - min(values))
                    hi.append(max(values) - m)
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    if samples:
        backends_only = [d for d in datapaths if d != UNDERLAY]
        ax = axes.pop(0)
        bars(ax, datapaths, [("gbps_1", "1 stream"), ("gbps_4", "4 streams")], "Gbit/s")
        ax.set_title("TCP throughput (iperf3), median and range")
        ax = axes.pop(0)
        bars(ax, datapaths, [("p50_us", "p50"), ("p99_us", "p99")], "µs")
        ax.set_yscale("log")
        ax.set_title("request/response round trip, 64 bytes over TCP (log scale)")
        ax = axes.pop(0)
        bars(ax, backends_only, [("cpu_src_pct_1", "sender"), ("cpu_dst_pct_1", "receiver")], "%")
        ax.set_title("agent CPU during the 1-stream run (% of one core)")
        ax = axes.pop(0)
        bars(ax, backends_only, [("join_ms", "join→reachable")], "ms")
        ax.set_title("new node's lease in etcd → its container reachable")
    if scale:
        for ax, metric, unit, what in (
            (axes.pop(0), "kernel_s", "s", "N peers written → all entries in the kernel"),
            (axes.pop(0), "rss_after_mb", "MB", "agent memory (VmRSS) with N peers"),
            (axes.pop(0), "full_ms", "ms", "one full reconcile with nothing to change"),
        ):
            for backend in dict.fromkeys(r["backend"] for r in scale):
                rs = [r for r in scale if r["backend"] == backend]
                key, label = metric, backend
                if metric == "kernel_s" and not rs[0]["expected"]:
                    key, label = "seen_s", f"{backend} (no kernel entries: all peers seen)"
                ys = [float("nan") if r[key] is None else r[key] for r in rs]
                ax.plot([r["peers"] for r in rs], ys, "o-", label=label)
            ax.set_xlabel("synthetic peers")
            ax.set_ylabel(unit)
            ax.set_title(what)
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Settings:
    backends: list[str]
    rounds: int
    seconds: float
    rtts: int
    scale: list[int]
    scale_only: bool
    scale_timeout: float
    out: Path
    prefix: str


class Benchmark:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.progress = Progress()
        self.samples: list[Sample] = []
        self.scale: list[Sample] = []
        self.errors: list[str] = []
        self._labs = 0

    def lab_prefix(self) -> str:
        """A fresh namespace prefix for each lab of this run: the run's prefix and a number."""
        self._labs += 1
        return f"{self.s.prefix}{self._labs:02d}"

    def error(self, what: str, e: BaseException) -> None:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        line = f"{what}: {lines[0]}" + (f" … {lines[-1].strip()}" if len(lines) > 1 else "")
        self.errors.append(line)
        self.progress(f"FAILED {line}")

    def measure(self, pair: Pair, sample: Sample, tag: str) -> None:
        s = self.s
        for streams in (1, 4):
            self.progress(f"{tag} {pair.name}: iperf3 {streams} stream{'s' * (streams > 1)}...")
            try:
                r = iperf3(pair, streams, s.seconds)
            except FAILURES as e:
                self.error(f"{tag} {pair.name} iperf3 -P {streams}", e)
                continue
            sample.update({f"{k}_{streams}": v for k, v in r.items()})
        self.progress(f"{tag} {pair.name}: request/response x{s.rtts}...")
        try:
            rtts = request_response(pair, s.rtts)
        except FAILURES as e:
            self.error(f"{tag} {pair.name} request/response", e)
            return
        us = [r / 1000 for r in rtts]
        sample.update(p50_us=percentile(us, 50), p99_us=percentile(us, 99), rtt_ns=rtts)
        if pair.agents:
            try:
                sample["rss_mb"] = rss_mb(pair.agents[0])
            except FAILURES as e:
                self.error(f"{tag} {pair.name} agent memory", e)

    def datapath(self, stack: ExitStack) -> list[str]:
        labs: list[BackendLab] = []
        for backend in self.s.backends:
            try:
                lab = stack.enter_context(Lab(nodes=3, containers=1, prefix=self.lab_prefix()))
            except FAILURES as e:  # (Lab cleans up what it built before raising)
                self.error(f"{backend}: lab set-up", e)
                continue
            self.progress(f"{backend}: lab {lab.prefix}, etcd, agents on n1 and n2")
            try:
                lab.start_etcd()
                bl = BackendLab(backend, lab)
                bl.start()
            except FAILURES as e:
                self.error(f"{backend}: lab set-up", e)
                lab.close()
                continue
            labs.append(bl)
        if not labs:
            return []
        pairs = [labs[0].underlay()] + [bl.pair() for bl in labs]
        self.progress(f"{UNDERLAY}: node to node in lab {labs[0].lab.prefix}, over eth0")
        for r in range(1, self.s.rounds + 1):
            tag = f"[round {r}/{self.s.rounds}]"
            by_name: dict[str, Sample] = {}
            for pair in pairs:
                sample: Sample = {"round": r, "datapath": pair.name}
                self.measure(pair, sample, tag)
                by_name[pair.name] = sample
                self.samples.append(sample)
            for bl in labs:
                self.progress(f"{tag} {bl.backend}: node 3 joins...")
                try:
                    by_name[bl.backend].update(bl.join())
                except FAILURES as e:
                    self.error(f"{tag} {bl.backend} join", e)
        return [p.name for p in pairs]

    def run(self) -> int:
        s = self.s
        datapaths: list[str] = []
        if not s.scale_only:
            with ExitStack() as stack:
                datapaths = self.datapath(stack)
                self.progress("tearing the data-path labs down")
        for peers in s.scale:
            for backend in s.backends:
                self.progress(f"[scale] {backend}: {peers} peers...")
                try:
                    result = scale_run(backend, peers, s.scale_timeout, self.lab_prefix())
                except FAILURES as e:
                    self.error(f"[scale] {backend} {peers} peers", e)
                    continue
                if not result["converged"]:
                    self.error(
                        f"[scale] {backend} {peers} peers",
                        BenchError(f"not converged within {s.scale_timeout:g} s"),
                    )
                elif result["expected"]:
                    self.progress(
                        f"[scale] {backend}: {peers} peers in the kernel after "
                        f"{result['kernel_s']:.2f} s"
                    )
                self.scale.append(result)
        return self.report(datapaths)

    def report(self, datapaths: list[str]) -> int:
        s = self.s
        wall = self.progress.elapsed()
        info = machine()
        date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        summary = summarise(self.samples, datapaths)
        print()
        if self.samples:
            print(render_table(summary, s.rounds))
            print()
        if self.scale:
            print(render_scale_table(self.scale))
            print()
        s.out.mkdir(parents=True, exist_ok=True)
        doc = {
            "date": date,
            "machine": info,
            "settings": {
                "backends": s.backends,
                "rounds": s.rounds,
                "iperf3_seconds": s.seconds,
                "round_trips": s.rtts,
                "round_trip_warmup": RR_WARMUP,
                "message_bytes": 64,
                "network": NETWORK,
                "scale_peers": s.scale,
                "scale_network": SCALE_NETWORK,
                "scale_reconcile_interval": SCALE_RECONCILE,
                "scale_timeout": s.scale_timeout,
            },
            "wall_seconds": round(wall, 1),
            "summary": summary,
            "samples": self.samples,
            "scale": self.scale,
            "errors": self.errors,
        }
        json_path, png_path = s.out / "benchmark.json", s.out / "benchmark.png"
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
        title = (
            f"flanneld-py backends, {date}: {info['nproc']} CPUs {info['cpu_model']}, "
            f"kernel {info['kernel']}" + (f"; medians of {s.rounds} rounds" if self.samples else "")
        )
        if self.samples or self.scale:
            chart(png_path, self.samples, datapaths, self.scale, title)
            print(f"wrote {json_path} and {png_path}; the run took {wall:.0f} s")
        else:
            print(f"nothing was measured; wrote {json_path}; the run took {wall:.0f} s")
        for line in self.errors:
            print(f"error: {line}", file=sys.stderr)
        return 1 if self.errors else 0


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of counts"
        ) from None
    if values == [0]:
        return []
    if any(v < 1 or v > 60000 for v in values):
        raise argparse.ArgumentTypeError("peer counts must be between 1 and 60000, or just 0")
    return values


def parse_args(argv: list[str] | None) -> Settings:
    known = backends.known_backends()
    parser = argparse.ArgumentParser(
        prog="deploy/benchmark.sh",
        description="Measure every backend against the bare underlay in the namespace lab: "
        "throughput, latency, agent CPU and memory, join time; and control-plane scale. "
        "Run as root.",
    )
    parser.add_argument(
        "--backends",
        default=",".join(known),
        help=f"comma-separated backends to measure (default: all registered: {','.join(known)})",
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of each iperf3 run (default 3)"
    )
    parser.add_argument(
        "--rtts", type=int, default=5000, help="timed round trips per latency run (default 5000)"
    )
    parser.add_argument(
        "--scale",
        type=_csv_ints,
        default=[1000, 5000],
        metavar="N,N",
        help="control-plane scale: the numbers of synthetic peers to measure with "
        "(default 1000,5000; 0 skips it)",
    )
    parser.add_argument(
        "--scale-only", action="store_true", help="skip the data-path rounds (needs --scale)"
    )
    parser.add_argument(
        "--scale-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for N peers to converge, and to be removed (default 180)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmark-results"),
        help="directory for benchmark.json and benchmark.png (default benchmark-results)",
    )
    parser.add_argument(
        "--prefix",
        help="namespace prefix of the run's labs (2 digits appended per lab; default random)",
    )
    a = parser.parse_args(argv)
    chosen = [b.strip().lower() for b in a.backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in known]
    if unknown or not chosen:
        parser.error(f"--backends: unknown {', '.join(unknown) or '(none)'}; choose from {known}")
    if a.rounds < 1 or a.seconds <= 0 or a.rtts < 10:
        parser.error("--rounds must be at least 1, --seconds positive, --rtts at least 10")
    if a.scale_only and not a.scale:
        parser.error("--scale-only needs --scale N,...")
    if a.prefix and not re.fullmatch(r"[a-z][a-z0-9]{1,8}", a.prefix):
        parser.error("--prefix must be a lower-case letter and 1 to 8 letters or digits")
    return Settings(
        backends=chosen,
        rounds=a.rounds,
        seconds=a.seconds,
        rtts=a.rtts,
        scale=a.scale,
        scale_only=a.scale_only,
        scale_timeout=a.scale_timeout,
        out=a.out,
        prefix=a.prefix or f"bm{secrets.token_hex(2)}",
    )


def missing_tools() -> list[str]:
    """What this run cannot do without, each with its fix."""
    missing = []
    if shutil.which("iperf3") is None:
        missing.append("iperf3 (apt-get install iperf3)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib (pip install -e '.[bench]')")
    return missing


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    if os.geteuid() != 0:
        print(
            "deploy/benchmark.sh: run as root: the lab creates network namespaces", file=sys.stderr
        )
        return 1
    missing = missing_tools()
    if missing:
        print(f"deploy/benchmark.sh: missing {', '.join(missing)}", file=sys.stderr)
        return 1
    try:
        with signals_interrupt():
            return Benchmark(settings).run()
    except KeyboardInterrupt:
        print("\ninterrupted; the labs are torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
