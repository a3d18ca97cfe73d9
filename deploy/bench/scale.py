"""The control-plane scale runs: one node, N synthetic peers written at once, and how the
agent copes, measured from its state (never from its log).

For every backend and every N, a one-node lab: the agent runs, N synthetic peer leases like
that backend's real ones are written into etcd in batches (PublicIPs in 198.18.0.0/15, made
on-link in the node by a route, so host-gw has N distinct gateways). Measured:
- until the agent knows every peer (`flannel_peers` in its /metrics) and until every
  route/FDB/ARP entry is in the node's kernel (`ip -j route`, `ip -j neigh`, `bridge -j fdb`);
- the agent's memory (VmRSS) before and with the peers;
- the wall time of a periodic (full) reconcile with nothing to change
  (`flannel_reconcile_last_duration_seconds` once `flannel_reconcile_runs_total{mode="full"}`
  stepped), and the agent's CPU for the event pass after a change to a peer's record that no
  plan looks at;
- from one more lease committed in etcd to its route in the kernel;
- a cold start: the agent stopped, the node's entries and device flushed (a rebooted node),
  the agent started again with the N + 1 leases in etcd: until it is ready (subnet.env
  written, which it does after its first pass) and until every entry is in the kernel;
- from the leases revoked until no peer is known and no entry is left.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from ipaddress import IPv4Address, IPv4Network, ip_interface

from flanneld.core.lease import LeaseAttrs
from flanneld.core.schedule import FULL_PASS_SHARE
from flanneld.core.subnets import subnet_key

from ..cluster import PREFIX, AgentExited, Cluster
from ..lab import Lab, Node
from .measure import (
    FAILURES,
    PROBES,
    BenchError,
    Journal,
    cpu_burst_ms,
    kernel_table,
    poll,
    rss_mb,
)
from .stats import Sample, median

SCALE_NETWORK = "10.0.0.0/8"
PEER_IPS = IPv4Network("198.18.0.0/15")  # synthetic peers' PublicIPs, on-link in the node
SCALE_RECONCILE = 5  # the scale agent's --reconcile-interval (full passes, timed via /metrics)
NOOP_PASSES = 3  # no-op reconciles timed per run, of each kind (the median is reported)
LEASE_TTL = 3600
FULL_RUNS = 'flannel_reconcile_runs_total{mode="full"}'


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
        elif backend == "wireguard":  # a distinct key each (any 32 bytes but a few will do)
            key = base64.b64encode(hashlib.sha256(f"peer {i}".encode()).digest()).decode()
            attrs = LeaseAttrs(ip, "wireguard", {"PublicKey": key})
        else:
            attrs = LeaseAttrs(ip, backend)
        leases.append((f"{PREFIX}/subnets/{subnet_key(subnet)}", attrs))
    return leases


def expected_entries(backend: str, peers: int) -> dict[str, int]:
    """The per-peer kernel entries a backend programs (DESIGN.md); udp keeps its peers in the
    agent's own table, wireguard in its device."""
    per_peer = {"host-gw": ("route",), "vxlan": ("route", "fdb", "arp")}
    return {kind: peers for kind in per_peer.get(backend, ())}


def kernel_entries(lab: Lab, node: Node, kinds: list[str]) -> dict[str, int]:
    """How many entries of each kind the node's kernel holds: the agent's routes (protocol
    155), the permanent ARP entries and the FDB entries with a destination on flannel.1."""
    counts = {}
    for kind in kinds:
        if kind == "route":
            routes = kernel_table(lab, node.ns, "ip", "-j", "route", "show", "proto", "155")
            counts[kind] = len(routes)
        elif kind == "arp":
            cmd = ("ip", "-j", "neigh", "show", "dev", "flannel.1", "nud", "permanent")
            counts[kind] = len(kernel_table(lab, node.ns, *cmd, check=False))
        else:
            cmd = ("bridge", "-j", "fdb", "show", "dev", "flannel.1")
            counts[kind] = sum("dst" in e for e in kernel_table(lab, node.ns, *cmd, check=False))
    return counts


class ScaleLab:
    """One node running `backend`'s agent in a lab whose etcd gets synthetic peers."""

    def __init__(self, lab: Lab, backend: str) -> None:
        self.lab, self.backend = lab, backend
        self.node = lab.nodes[0]
        lab.start_etcd()
        self.cluster = Cluster(
            lab,
            {"Network": SCALE_NETWORK, "Backend": {"Type": backend}},
            (f"--reconcile-interval={SCALE_RECONCILE}",),
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

    def metric(self, series: str) -> float:
        """One sample of the agent's /metrics (0 when absent)."""
        return self.cluster.metric_samples(self.node).get(series, 0.0)

    def full_pass_ms(self) -> float | None:
        """Wall time of the next periodic (full) reconcile, from the agent's metrics. At
        scale the agent spaces full passes out (`full_pass_period`): up to a minute apart for
        a 3 s pass."""
        start = self.metric(FULL_RUNS)
        wait = SCALE_RECONCILE * 3 + 3 / FULL_PASS_SHARE
        if not poll(lambda: self.metric(FULL_RUNS) > start, wait, 0.2):
            return None
        return 1000 * self.metric("flannel_reconcile_last_duration_seconds")

    def cold_start(self, expected: dict[str, int], timeout: float) -> tuple[float, float | None]:
        """The agent stopped, what it programmed flushed as a reboot would (its devices, its
        routes), subnet.env removed, the agent started again: seconds from its start until it
        is ready and until every entry in `expected` is in the kernel (None: not within
        `timeout`)."""
        lab, node = self.lab, self.node
        self.cluster.stop(node)
        for device in ("flannel.1", "flannel-v6.1"):
            lab.run(node.ns, "ip", "link", "del", device, check=False)
        for family in ("-4", "-6"):
            lab.run(node.ns, "ip", family, "route", "flush", "proto", "155", check=False)
        self.cluster.subnet_file(node).unlink(missing_ok=True)
        started = time.monotonic()
        self.cluster.start(node)
        self.cluster.wait_ready(node, timeout=timeout)
        ready = time.monotonic() - started
        kinds = sorted(expected)
        done = poll(lambda: kernel_entries(self.lab, node, kinds) == expected, timeout, 0.05)
        return ready, (done - started if done else None)

    def one_more_ms(self, key: str, attrs: LeaseAttrs) -> float | None:
        """ms from one more lease committed in etcd to its route in the kernel."""
        subnet = key.rsplit("/", 1)[1].replace("-", "/")
        _, committed = self.put_all([(key, attrs)])
        route = ("ip", "-j", "route", "show", subnet, "proto", "155")
        done = poll(lambda: bool(kernel_table(self.lab, self.node.ns, *route)), 30, 0.01)
        return 1000 * (done - committed) if done else None


def scale_run(backend: str, peers: int, timeout: float, prefix: str) -> Sample:
    """One agent, `peers` synthetic peers written at once: see the module docstring."""
    expected = expected_entries(backend, peers)
    kinds = sorted(expected)
    with Lab(nodes=1, containers=0, prefix=prefix) as lab:
        sl = ScaleLab(lab, backend)
        pid, own = sl.start()
        rss_before = rss_mb(pid)
        *leases, extra = synthetic_leases(backend, peers + 1, own)
        first, last = sl.put_all(leases)
        counts: dict[str, int] = {}
        seen_at: float | None = None

        def converged() -> bool:
            nonlocal counts, seen_at
            if seen_at is None and sl.metric("flannel_peers") >= peers:
                seen_at = time.monotonic()
            counts = kernel_entries(lab, sl.node, kinds)
            return seen_at is not None and counts == expected

        done_at = poll(converged, timeout)
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
        cold_ready = cold_kernel = cold_rss = None
        if done_at:
            with_extra = {kind: n + 1 for kind, n in expected.items()}
            cold_ready, cold_kernel = sl.cold_start(with_extra, timeout)
            cold_rss = rss_mb(sl.cluster.procs[sl.node.name].pid)
        revoke_at = time.monotonic()
        sl.revoke()
        zero = dict.fromkeys(kinds, 0)
        gone_at = poll(
            lambda: sl.metric("flannel_peers") == 0 and kernel_entries(lab, sl.node, kinds) == zero,
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
        "kernel_after_write_s": done_at - last if done_at else None,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_after,
        "noop_cpu_ms": noop,
        "noop_ms": median(noop),
        "full_ms": median(full) if full else None,
        "one_more_ms": one_more,
        "cold_ready_s": cold_ready,
        "cold_kernel_s": cold_kernel,
        "cold_rss_mb": cold_rss,
        "removed_s": gone_at - revoke_at if gone_at else None,
    }


def run_scale(
    journal: Journal,
    prefixes: Iterator[str],
    backends: list[str],
    counts: list[int],
    timeout: float,
) -> list[Sample]:
    """`scale_run` for every count of peers and every backend, each in a lab named from
    `prefixes`; the results of those that ran (a failure is journaled)."""
    results = []
    for peers in counts:
        for backend in backends:
            journal(f"[scale] {backend}: {peers} peers...")
            try:
                result = scale_run(backend, peers, timeout, next(prefixes))
            except FAILURES as e:
                journal.failed(f"[scale] {backend} {peers} peers", e)
                continue
            if not result["converged"]:
                journal.failed(
                    f"[scale] {backend} {peers} peers",
                    BenchError(f"not converged within {timeout:g} s"),
                )
            elif result["expected"]:
                journal(
                    f"[scale] {backend}: {peers} peers in the kernel after "
                    f"{result['kernel_s']:.2f} s"
                )
            results.append(result)
    return results
