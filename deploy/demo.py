"""The one-command demo lab (run it through `deploy/demo.sh`, which installs what is missing).

It builds the network-namespace lab (deploy.lab) with etcd on the switch, N nodes and their
containers, runs the agent with the chosen backend on every node (deploy.cluster), proves
connectivity with a ping matrix and prints a summary: nodes, subnets, backend, MTU and the
reachability grid. Exit status 0 only when every container answers every other node's
containers. With --ipv6 the lab, the network and the containers are dual-stack and a second
grid pings the containers' IPv6 addresses; every ping of both grids must be answered.
Everything is torn down on exit, on Ctrl-C and on failure, unless --keep leaves the lab up
(until Ctrl-C or `--down --prefix P` from another terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import backends
from flanneld.core.text import table_lines

from .cluster import AgentExited, Cluster
from .lab import ETCD_ENDPOINT, Container, Lab, LabError, Node, cleanup, etcd_tool

BACKENDS = ("host-gw", "vxlan", "udp", "wireguard")
NETWORK = "10.244.0.0/16"
NETWORK6 = "fd00:10:244::/56"  # IPv6Network of a dual-stack demo (--ipv6)
READY_TIMEOUT = 30.0  # per node, from the agent's start to its subnet.env
REACH_TIMEOUT = 15.0  # from the last subnet.env to an all-green ping matrix
Matrix = dict[tuple[str, str], bool]


def default_backend() -> str:
    return "vxlan" if "vxlan" in backends.known_backends() else "host-gw"


class Progress:
    """Progress lines with the time since the start: `[  1.2s] message`."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed():5.1f}s] {message}", flush=True)


# -- the summary (pure) ----------------------------------------------------------------------


def _marks(encoding: str | None, color: bool) -> tuple[str, str, str]:
    """(answered, unanswered, same node) marks that the terminal can print."""
    try:
        "✓✗·".encode(encoding or "ascii")
        ok, bad, same = "✓", "✗", "·"
    except (UnicodeEncodeError, LookupError):
        ok, bad, same = "+", "x", "."
    if color:
        ok, bad = f"\033[32m{ok}\033[0m", f"\033[31m{bad}\033[0m"
    return ok, bad, same


def _address(container: Container, family: int) -> str | None:
    return container.ip if family == 4 else container.ip6


def expected_pairs(nodes: list[Node], family: int = 4) -> list[tuple[str, str | None]]:
    """Every (source namespace, destination address) the grid of `family` must see answered:
    each container pings each container on another node (an address of None: a container
    without an address of that family, which counts as unanswered)."""
    return [
        (src.ns, _address(dst, family))
        for a in nodes
        for b in nodes
        if a is not b
        for src in a.containers
        for dst in b.containers
    ]


def tally(nodes: list[Node], matrix: Matrix, family: int = 4) -> tuple[int, int]:
    """(answered, expected): how many of the pairs `expected_pairs` names `matrix` holds an
    answer for, and how many it names."""
    pairs = expected_pairs(nodes, family)
    answered = sum(dst is not None and bool(matrix.get((src, dst))) for src, dst in pairs)
    return answered, len(pairs)


def _grid_lines(
    nodes: list[Node], matrix: Matrix, family: int, title: str, marks: tuple[str, str, str]
) -> list[str]:
    """One ping grid (row pings column) of the containers' addresses of `family`."""
    ok, bad, same = marks
    containers = [(node, c) for node in nodes for c in node.containers]
    labels = [f"{node.name}c{j}" for node in nodes for j in range(1, len(node.containers) + 1)]
    grid = [["", *labels]]
    for (src_node, src), label in zip(containers, labels, strict=True):
        cells = [
            same
            if dst_node is src_node
            else ok
            if (dst_ip := _address(dst, family)) is not None and matrix.get((src.ns, dst_ip))
            else bad
            for dst_node, dst in containers
        ]
        grid.append([label, *cells])
    return [
        "",
        f"  {title}",
        *table_lines(grid, indent="    ", center=True),
        f"    {ok} answered   {bad} no answer   {same} same node, not pinged",
    ]


def render_summary(
    nodes: list[Node],
    envs: dict[str, dict[str, str]],
    backend: str,
    matrix: Matrix,
    seconds: float,
    *,
    encoding: str | None = "utf-8",
    color: bool = False,
    matrix6: Matrix | None = None,
) -> str:
    """The readable result: a node table, the ping grid (row pings column) and a verdict;
    with `matrix6` (a dual-stack demo) a second grid of the containers' IPv6 addresses, and
    the verdict counts both."""
    marks = _marks(encoding, color)
    network = NETWORK if matrix6 is None else f"{NETWORK} and {NETWORK6}"
    lines = [
        f"flanneld-py demo lab: {len(nodes)} nodes, backend {backend}, network {network}",
        "",
    ]
    with_v6 = any("FLANNEL_IPV6_SUBNET" in env for env in envs.values())
    v6_column = ["IPv6 subnet"] if with_v6 else []
    rows = [["node", "namespace", "underlay", "subnet", *v6_column, "MTU", "containers"]]
    for node in nodes:
        env = envs.get(node.name, {})
        rows.append(
            [
                node.name,
                node.ns,
                " ".join(x for x in (node.iface, node.ip, node.ip6) if x),
                env.get("FLANNEL_SUBNET", "-"),
                *([env.get("FLANNEL_IPV6_SUBNET", "-")] * with_v6),
                env.get("FLANNEL_MTU", "-"),
                " ".join(a for c in node.containers for a in (c.ip, c.ip6) if a) or "-",
            ]
        )
    lines += table_lines(rows)

    if len(nodes) > 1 and any(node.containers for node in nodes):
        if matrix6 is None:
            title = "ping matrix (row pings column, one ICMP echo each):"
            lines += _grid_lines(nodes, matrix, 4, title, marks)
        else:
            title = "IPv4 ping matrix (row pings column, one ICMP echo each):"
            lines += _grid_lines(nodes, matrix, 4, title, marks)
            title = "IPv6 ping matrix (row pings column, one ICMPv6 echo each):"
            lines += _grid_lines(nodes, matrix6, 6, title, marks)
    if matrix6 is None:
        answered, total = sum(matrix.values()), len(matrix)
        detail = ""
    else:
        (a4, t4), (a6, t6) = tally(nodes, matrix, 4), tally(nodes, matrix6, 6)
        answered, total = a4 + a6, t4 + t6
        detail = f" (IPv4 {a4}/{t4}, IPv6 {a6}/{t6})"
    if not total:
        verdict = "nothing to ping: one node"
    elif answered == total:
        verdict = f"{answered}/{total} pings answered{detail}: all green"
    else:
        verdict = f"{answered}/{total} pings answered{detail}: {total - answered} FAILED"
    lines += ["", f"  {verdict} ({seconds:.1f} s)"]
    return "\n".join(lines)


# -- bringing the lab up and down --------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP unwind like Ctrl-C (KeyboardInterrupt), so the
    labs of a demo or a benchmark are torn down; the old handlers come back on leaving it."""
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _print_keep_help(lab: Lab) -> None:
    first = lab.nodes[0]
    etcdctl = f"{etcd_tool('etcdctl')} --endpoints={ETCD_ENDPOINT}"
    lines = [
        "",
        f"the lab {lab.prefix} stays up (agent and etcd logs in {lab.workdir}):",
        f"  enter a node:       ip netns exec {first.ns} bash",
    ]
    if first.containers:
        lines.append(f"  enter a container:  ip netns exec {first.containers[0].ns} bash")
    lines += [
        f"  the leases:         ip netns exec {lab.switch_ns} {etcdctl} get --prefix /coreos.com",
        f"  tear it down:       Ctrl-C here, or deploy/demo.sh --down --prefix {lab.prefix}",
    ]
    print("\n".join(lines), flush=True)


def up(args: argparse.Namespace) -> int:
    progress = Progress()
    config: dict = {"Network": NETWORK, "Backend": {"Type": args.backend}}
    networks = NETWORK
    if args.ipv6:
        config.update({"EnableIPv6": True, "IPv6Network": NETWORK6})
        networks = f"{NETWORK} and {NETWORK6}"
    with Lab(args.nodes, args.containers, prefix=args.prefix, ipv6=args.ipv6) as lab:
        progress(
            f"lab {lab.prefix}: {args.nodes} node namespaces, {args.containers} container(s) "
            f"each, a switch {lab.switch_ns}" + (", a dual-stack underlay" if args.ipv6 else "")
        )
        lab.start_etcd()
        progress(f"etcd is up at {lab.etcd_endpoint}; network config: {networks}, {args.backend}")
        cluster = Cluster(lab, config)
        for node in lab.nodes:
            cluster.start(node)
        progress(f"flanneld started on {', '.join(n.name for n in lab.nodes)}")
        envs: dict[str, dict[str, str]] = {}
        matrix6: Matrix | None = None
        try:
            for node in lab.nodes:
                envs[node.name] = env = cluster.wait_ready(node, timeout=READY_TIMEOUT)
                if args.ipv6 and not env.get("FLANNEL_IPV6_SUBNET"):
                    raise LabError(
                        f"{node.name}'s subnet.env has no FLANNEL_IPV6_SUBNET: its agent "
                        "leased no IPv6 subnet"
                    )
                subnet6 = f" and {env['FLANNEL_IPV6_SUBNET']}" if args.ipv6 else ""
                progress(
                    f"{node.name} ready: subnet {env['FLANNEL_SUBNET']}{subnet6}, "
                    f"MTU {env['FLANNEL_MTU']}, {len(node.containers)} container(s) on cni0"
                )
            pairs = len(lab.nodes) * (len(lab.nodes) - 1) * args.containers**2
            if not args.ipv6:
                progress(f"ping matrix: {pairs} container pairs across nodes")
                matrix = cluster.wait_reachable(REACH_TIMEOUT)
            else:
                progress(f"ping matrices: {pairs} container pairs across nodes, IPv4 and IPv6")
                matrix = cluster.wait_reachable(REACH_TIMEOUT)
                matrix6 = cluster.wait_reachable(REACH_TIMEOUT, family=6)
        except (AgentExited, TimeoutError, LabError) as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            for node in lab.nodes:
                tail = "\n".join(cluster.log(node).splitlines()[-10:])
                print(f"--- flanneld on {node.name}, last lines:\n{tail}", file=sys.stderr)
            progress(f"tearing down the lab {lab.prefix}")
            return 1
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        print(
            "\n"
            + render_summary(
                lab.nodes,
                envs,
                args.backend,
                matrix,
                progress.elapsed(),
                encoding=sys.stdout.encoding,
                color=color,
                matrix6=matrix6,
            ),
            flush=True,
        )
        if args.keep:
            (lab.workdir / "demo.pid").write_text(f"{os.getpid()}\n")
            _print_keep_help(lab)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
        progress(f"tearing down the lab {lab.prefix}")
    answered6, expected6 = (0, 0) if matrix6 is None else tally(lab.nodes, matrix6, 6)
    return 0 if all(matrix.values()) and answered6 == expected6 else 1


def _workdirs(prefix: str) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"{prefix}-lab-*"))


def _is_demo(pid: int) -> bool:
    """Whether `pid` is a running demo (a zombie's command line is empty)."""
    try:
        return b"deploy.demo" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def down(prefix: str) -> int:
    """End a kept demo with `prefix` (its process tears its lab down), then delete whatever a
    killed one left behind."""
    for workdir in _workdirs(prefix):
        with contextlib.suppress(OSError, ValueError):
            pid = int((workdir / "demo.pid").read_text())
            if _is_demo(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while _is_demo(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                print(f"stopped the demo (pid {pid})")
    for ns in cleanup(prefix):
        print(f"deleted {ns}")
    for workdir in _workdirs(prefix):
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"no namespace of {prefix} is left")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deploy/demo.sh",
        description="The agent on a lab of network namespaces: N nodes, containers, etcd, a "
        "ping matrix. Run as root.",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help=f"the backend every node runs (default: {default_backend()})",
    )
    parser.add_argument(
        "--nodes", type=int, default=3, metavar="N", help="number of nodes, 1..20 (default 3)"
    )
    parser.add_argument(
        "--containers",
        type=int,
        default=1,
        metavar="N",
        help="containers per node, 1..8 (default 1)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the lab up until Ctrl-C (or --down)"
    )
    parser.add_argument(
        "--ipv6",
        action="store_true",
        help=f"dual-stack: the network gets IPv6Network {NETWORK6} too, nodes and containers "
        "IPv6 addresses, and a second ping grid pings those (host-gw, vxlan or wireguard)",
    )
    parser.add_argument("--down", action="store_true", help="tear down a kept lab (needs --prefix)")
    parser.add_argument(
        "--prefix",
        help="name prefix of the lab's namespaces (default: random, printed at the start)",
    )
    args = parser.parse_args(argv)
    if args.down and not args.prefix:
        parser.error("--down needs the --prefix of the lab to tear down")
    if args.prefix:
        try:
            Lab(prefix=args.prefix)  # only checks the name; nothing is built before `with`
        except ValueError as e:
            parser.error(str(e))
    if not 1 <= args.nodes <= 20:
        parser.error("--nodes must be between 1 and 20")
    if not 1 <= args.containers <= 8:
        parser.error("--containers must be between 1 and 8")
    args.backend = args.backend or default_backend()
    if args.ipv6 and args.backend == "udp":
        parser.exit(
            2,
            "deploy/demo.sh: --ipv6 needs host-gw, vxlan or wireguard: the udp backend carries "
            "IPv4 only\n",
        )
    if args.backend not in backends.known_backends():
        parser.error(
            f"backend {args.backend} is not available in this build; "
            f"choose one of: {', '.join(backends.known_backends())}"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("deploy/demo.sh: run as root: the lab creates network namespaces", file=sys.stderr)
        return 1
    try:
        if args.down:
            return down(args.prefix)
        with signals_interrupt():
            return up(args)
    except KeyboardInterrupt:
        print("\ninterrupted; the lab is torn down", file=sys.stderr)
        return 130
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
