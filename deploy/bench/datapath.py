"""The data-path runs: one lab per backend, and interleaved rounds over the bare underlay and
every backend's container-to-container path.

One lab per backend (3 nodes, 1 container each, the agent on nodes 1 and 2; node 3 is the
joining node). For the bare underlay (node 1 to node 2 over eth0: no encapsulation, no
container hop; the physical limit of this machine) and for every backend (container on node 1
to container on node 2), round by round (underlay, host-gw, vxlan, udp, underlay, ...):
- TCP throughput with iperf3, 1 stream and 4 streams;
- request/response latency: 64-byte messages echoed back and forth on one TCP connection,
  each round trip timed; p50 and p99 (idle `ping` would overstate a userspace datapath);
- ping RTT p50/p99 at send intervals of 0.2 s, 0.02 s and 0.002 s (`pings`: iputils ping,
  container to container; node to node for the underlay), the latency at ordinary load, when a
  userspace datapath wakes from sleep for every packet;
- the agents' CPU (utime+stime from /proc, % of one core) on the sending and the receiving
  node during the 1-stream run, and the sending node's agent memory (VmRSS);
- once per round, with every lab quiet, each backend's agents' CPU over an idle window
  (`pings.IDLE_SECONDS`: an idle agent must not spin);
- join-to-reachable: the agent starts on node 3 (its containers already on cni0, its kernel
  wiped of the agent's state, its old lease deleted); the time from its lease key appearing
  in etcd to the first echo answered from its container to node 1's container.

With IPv6 on (the default), every dual-stack backend (host-gw, vxlan) also gets a dual-stack
lab of its own (the same 3 nodes, an IPv6 underlay fd00:192::/64, the network NETWORK6), in
the same rounds, after the IPv4 pairs: the bare IPv6 underlay (node 1 to node 2 over eth0's
IPv6 address) and each backend's containers over IPv6, as "underlay (IPv6)", "host-gw (IPv6)",
"vxlan (IPv6)": iperf3 -6 with 1 stream, the request/response round trips, the agents' CPU
and memory; no join and no pings (the IPv4 rows have them). Separate labs, not the IPv4 ones made
dual-stack: in dual-stack vxlan's MTU is base − 70 rather than base − 50 (one FLANNEL_MTU
for both families), and the agent programs a second device and twice the routes, so the
IPv4 rows would no longer measure what they did.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_interface

from flanneld.core.subnets import first_host, subnet_key
from flanneld.edges import subnetenv

from ..cluster import PREFIX, Cluster, wait_until
from ..lab import Lab, etcd_tool, stop_process
from .measure import (
    FAILURES,
    PROBES,
    BenchError,
    Journal,
    cpu_seconds,
    kernel_table,
    rss_mb,
)
from .pings import IDLE_SECONDS, PING_COUNTS, idle_cpu_pct, ping_rtts, ping_summary
from .stats import PING_INTERVALS, UNDERLAY, UNDERLAY6, Sample, ipv6_name, percentile

NETWORK = "10.244.0.0/16"
NETWORK6 = "fd00:10:244::/56"  # the IPv6Network of the dual-stack labs
DUAL_STACK_BACKENDS = ("host-gw", "vxlan")  # udp carries IPv4 only (the config refuses it)
IPERF_PORT = 5201
RR_PORT = 7007
RR_WARMUP = 200
IPV6_STREAMS = (1,)  # the IPv6 rows' iperf3 runs: a single stream
JOIN_TIMEOUT = 30.0


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
    family: int = 4  # of dst_ip
    streams: tuple[int, ...] = (1, 4)  # the iperf3 runs: their numbers of parallel streams


def wait_listening(lab: Lab, ns: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait (up to 5 s) until the server `proc` in `ns` listens on TCP `port`."""

    def listening() -> bool:
        if proc.poll() is not None:
            raise BenchError(f"the server in {ns} exited with status {proc.returncode}")
        return bool(lab.run(ns, "ss", "-Hltn", f"sport = :{port}", timeout=5).stdout.strip())

    wait_until(listening, 5, step=0.02, what=f"a server listening on {ns}:{port}")


def iperf3(pair: Pair, streams: int, seconds: float) -> Sample:
    """One iperf3 run; Gbit/s received, retransmits, and the agents' CPU % meanwhile."""
    lab = pair.lab
    server = lab.spawn(
        pair.dst, "iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--rcv-timeout", "5000"
    )
    try:
        wait_listening(lab, pair.dst, IPERF_PORT, server)
        cpu0 = [cpu_seconds(p) for p in pair.agents or ()]
        t0 = time.monotonic()
        res = lab.run(
            pair.src,
            "iperf3",
            *(["-6"] if pair.family == 6 else []),
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


# datapaths measured beside a backend's default: the name, the backend, the agents' environment
VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "udp-userspace": ("udp", {"FLANNELD_UDP_KERNEL": "false"}),  # the fast path off
}


class BackendLab:
    """A lab running one backend: agents on nodes 1 and 2, node 3 ready to join. With `ipv6`
    (a dual-stack Lab) the network is dual-stack and the pairs run over IPv6; node 3 stays
    idle."""

    def __init__(self, backend: str, lab: Lab, ipv6: bool = False) -> None:
        self.backend = backend
        self.ipv6 = ipv6
        self.name = ipv6_name(backend) if ipv6 else backend  # the datapath's
        self.lab = lab
        self.n1, self.n2, self.n3 = lab.nodes
        kind, self.env = VARIANTS.get(backend, (backend, {}))
        config: dict = {"Network": NETWORK, "Backend": {"Type": kind}}
        if ipv6:
            config.update(EnableIPv6=True, IPv6Network=NETWORK6)
        self.cluster = Cluster(lab, config)
        self.joiner_subnet = IPv4Network("0.0.0.0/32")  # chosen in start()

    def start(self) -> None:
        """Agents up on nodes 1 and 2, their containers reachable (over IPv6 too in a
        dual-stack lab); in an IPv4 lab, node 3's containers on a cni0 with a subnet its agent
        will take (it is written into its subnet.env)."""
        for node in (self.n1, self.n2):
            self.cluster.start(node, env=self.env)
        envs = [self.cluster.wait_ready(node, timeout=30) for node in (self.n1, self.n2)]
        for family in (4, 6) if self.ipv6 else (4,):
            matrix = self.cluster.wait_reachable(15, family=family)
            if not matrix or not all(matrix.values()):
                raise BenchError(
                    f"{self.name}: containers on nodes 1 and 2 do not reach each other over "
                    f"IPv{family}"
                )
        if self.ipv6:
            return  # (with no IPv6 subnet, a container has no IPv6 address: no pair above)
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
        if self.ipv6:
            assert c2.ip6 is not None
            return Pair(self.name, self.lab, c1.ns, c2.ns, c2.ip6, pids, 6, IPV6_STREAMS)
        return Pair(self.backend, self.lab, c1.ns, c2.ns, c2.ip, pids)

    def underlay(self) -> Pair:
        if self.ipv6:
            assert self.n2.ip6 is not None
            n1, n2 = self.n1.ns, self.n2.ns
            return Pair(UNDERLAY6, self.lab, n1, n2, self.n2.ip6, None, 6, IPV6_STREAMS)
        return Pair(UNDERLAY, self.lab, self.n1.ns, self.n2.ns, self.n2.ip, None)

    @property
    def joiner_key(self) -> str:
        return f"{PREFIX}/subnets/{subnet_key(self.joiner_subnet)}"

    def node1_has_joiner(self) -> bool:
        """Whether node 1 still holds node 3's subnet: among its agent's peers (`flannelctl
        status`) or as a route of the agent's (protocol 155) in its kernel."""
        dst = str(self.joiner_subnet)
        if any(p["subnet"] == dst for p in self.cluster.status(self.n1)["peers"]):
            return True
        return bool(
            kernel_table(self.lab, self.n1.ns, "ip", "-j", "route", "show", dst, "proto", "155")
        )

    def reset_joiner(self) -> None:
        """Node 3 as a new node: agent stopped, lease gone (and node 1 has dropped it), no
        state of the agent left in its kernel."""
        if self.lab.etcdctl("del", self.joiner_key).strip() == "1":
            wait_until(
                lambda: not self.node1_has_joiner(),
                10,
                step=0.05,
                what=f"node 1 dropping {self.joiner_subnet}",
            )
        ns = self.n3.ns
        self.lab.run(ns, "ip", "route", "flush", "proto", "155")
        for link in kernel_table(self.lab, ns, "ip", "-j", "link", "show"):
            if link["ifname"].startswith("flannel"):
                self.lab.run(ns, "ip", "link", "del", link["ifname"], check=False)

    def join(self) -> Sample:
        """Start node 3's agent; ms from its key appearing in etcd to node 1's container
        getting an echo answered by node 3's container."""
        self.reset_joiner()
        src, dst = self.n1.containers[0], self.n3.containers[0]
        prober = self.lab.reach_probe(src.ns, dst.ip, JOIN_TIMEOUT, 0.005)
        try:
            with KeyWatch(self.lab, self.joiner_key) as watch:
                started = time.monotonic()
                self.cluster.start(self.n3, env=self.env)
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


def measure(
    journal: Journal,
    pair: Pair,
    sample: Sample,
    tag: str,
    seconds: float,
    rtts: int,
    pings: Sequence[int] = PING_COUNTS,
) -> None:
    """One round of `pair` into `sample`: iperf3 with each of the pair's numbers of streams
    (1 and 4; 1 over IPv6), `rtts` round trips, over IPv4 `pings[i]` pings at each of
    PING_INTERVALS (0: none), the sending agent's memory; a failed part is journaled and the
    rest goes on."""
    for streams in pair.streams:
        journal(f"{tag} {pair.name}: iperf3 {streams} stream{'s' * (streams > 1)}...")
        try:
            r = iperf3(pair, streams, seconds)
        except FAILURES as e:
            journal.failed(f"{tag} {pair.name} iperf3 -P {streams}", e)
            continue
        sample.update({f"{k}_{streams}": v for k, v in r.items()})
    journal(f"{tag} {pair.name}: request/response x{rtts}...")
    try:
        rtt_ns = request_response(pair, rtts)
    except FAILURES as e:
        journal.failed(f"{tag} {pair.name} request/response", e)
        return
    us = [r / 1000 for r in rtt_ns]
    sample.update(p50_us=percentile(us, 50), p99_us=percentile(us, 99), rtt_ns=rtt_ns)
    if pair.family == 4:
        measure_pings(journal, pair, sample, tag, pings)
    if pair.agents:
        try:
            sample["rss_mb"] = rss_mb(pair.agents[0])
        except FAILURES as e:
            journal.failed(f"{tag} {pair.name} agent memory", e)


def measure_pings(
    journal: Journal, pair: Pair, sample: Sample, tag: str, counts: Sequence[int]
) -> None:
    """`counts[i]` pings at PING_INTERVALS[i] from the pair's source to its destination; their
    p50/p99 into `sample`, the RTTs (µs) by interval under "ping_us"."""
    rtts: dict[float, list[float]] = {}
    for interval, count in zip(PING_INTERVALS, counts, strict=False):
        if count <= 0:
            continue
        journal(f"{tag} {pair.name}: ping every {interval:g} s x{count}...")
        try:
            rtts[interval] = ping_rtts(pair.lab, pair.src, pair.dst_ip, interval, count)
        except FAILURES as e:
            journal.failed(f"{tag} {pair.name} ping -i {interval:g}", e)
    sample.update(ping_summary(rtts))
    if rtts:
        sample["ping_us"] = {f"{iv:g}": [round(v, 1) for v in vs] for iv, vs in rtts.items()}


def measure_idle(
    journal: Journal, tag: str, labs: list[BackendLab], seconds: float
) -> dict[str, float]:
    """Every lab's agents on nodes 1 and 2 quiet for `seconds` s at once (nothing is sent
    anywhere meanwhile); per backend the mean CPU of an agent, % of one core."""
    pids = [[pid for pid in bl.pair().agents or ()] for bl in labs]
    journal(f"{tag} idle agents: CPU over {seconds:g} s...")
    try:
        cpu = idle_cpu_pct([pid for both in pids for pid in both], seconds)
    except FAILURES as e:
        journal.failed(f"{tag} idle agents' CPU", e)
        return {}
    out, at = {}, 0
    for bl, both in zip(labs, pids, strict=True):
        out[bl.backend] = sum(cpu[at : at + len(both)]) / len(both)
        at += len(both)
    return out


def build_lab(
    journal: Journal, stack: ExitStack, prefixes: Iterator[str], backend: str, ipv6: bool
) -> BackendLab | None:
    """A started BackendLab (its Lab kept open in `stack`), or None: the failure journaled."""
    name = ipv6_name(backend) if ipv6 else backend
    try:
        lab = stack.enter_context(Lab(nodes=3, containers=1, prefix=next(prefixes), ipv6=ipv6))
    except FAILURES as e:  # (Lab cleans up what it built before raising)
        journal.failed(f"{name}: lab set-up", e)
        return None
    kind = "dual-stack lab" if ipv6 else "lab"
    journal(f"{name}: {kind} {lab.prefix}, etcd, agents on n1 and n2")
    try:
        lab.start_etcd()
        bl = BackendLab(backend, lab, ipv6)
        bl.start()
    except FAILURES as e:
        journal.failed(f"{name}: lab set-up", e)
        lab.close()
        return None
    return bl


def run_rounds(
    journal: Journal,
    stack: ExitStack,
    prefixes: Iterator[str],
    backends: list[str],
    rounds: int,
    seconds: float,
    rtts: int,
    ipv6: bool = True,
    pings: Sequence[int] = PING_COUNTS,
    idle: float = IDLE_SECONDS,
) -> tuple[list[Sample], list[str]]:
    """Build a lab per backend, and with `ipv6` a dual-stack one per dual-stack backend (kept
    open in `stack`, named from `prefixes`), then `rounds` interleaved rounds (`pings`:
    the ping counts per interval; `idle`: s of the idle window, 0 for none), each ending
    with node 3 joining in every IPv4 lab; the samples and the datapaths measured: the
    underlay, the backends, then the IPv6 underlay and the backends over IPv6."""
    labs = [bl for b in backends if (bl := build_lab(journal, stack, prefixes, b, False))]
    dual = [b for b in backends if b in DUAL_STACK_BACKENDS] if ipv6 else []
    if ipv6 and not dual:
        journal(f"no IPv6 rows: only {', '.join(DUAL_STACK_BACKENDS)} carry IPv6")
    labs6 = [bl for b in dual if (bl := build_lab(journal, stack, prefixes, b, True))]
    pairs: list[Pair] = []
    if labs:
        pairs += [labs[0].underlay()] + [bl.pair() for bl in labs]
        journal(f"{UNDERLAY}: node to node in lab {labs[0].lab.prefix}, over eth0")
    if labs6:
        pairs += [labs6[0].underlay()] + [bl.pair() for bl in labs6]
        journal(f"{UNDERLAY6}: node to node in lab {labs6[0].lab.prefix}, over eth0's IPv6")
    if not pairs:
        return [], []
    samples: list[Sample] = []
    for r in range(1, rounds + 1):
        tag = f"[round {r}/{rounds}]"
        by_name: dict[str, Sample] = {}
        for pair in pairs:
            sample: Sample = {"round": r, "datapath": pair.name, "family": pair.family}
            measure(journal, pair, sample, tag, seconds, rtts, pings)
            by_name[pair.name] = sample
            samples.append(sample)
        if idle > 0 and labs:
            for backend, pct in measure_idle(journal, tag, labs, idle).items():
                by_name[backend]["idle_cpu_pct"] = pct
        for bl in labs:
            journal(f"{tag} {bl.backend}: node 3 joins...")
            try:
                by_name[bl.backend].update(bl.join())
            except FAILURES as e:
                journal.failed(f"{tag} {bl.backend} join", e)
    return samples, [p.name for p in pairs]
