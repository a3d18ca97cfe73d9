"""The backend benchmark's command: its options, and the run from the labs to the report.

Run it through `deploy/benchmark.sh` (installs iperf3 and matplotlib) as root. It measures
every backend against the bare underlay in interleaved rounds in the namespace lab (throughput,
latency, pings at three send intervals, agent CPU and memory, an idle agent's CPU, join time:
deploy/bench/datapath.py, deploy/bench/pings.py), and in the same rounds
host-gw and vxlan over IPv6 against the IPv6 underlay, in dual-stack labs (`--no-ipv6` skips
them); then the control plane with N synthetic peers (deploy/bench/scale.py; `--scale 0`
skips it, `--scale-only` skips the data path). The table gives medians over the rounds and
each datapath's ratio to the underlay of its address family (deploy/bench/stats.py). Output
(deploy/bench/report.py): a table on the terminal, `<out>/benchmark.json` (date, machine,
settings, every raw sample) and `<out>/benchmark.png`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import secrets
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import backends

from .bench.datapath import DUAL_STACK_BACKENDS, NETWORK, NETWORK6, RR_WARMUP, VARIANTS, run_rounds
from .bench.measure import Journal
from .bench.pings import IDLE_SECONDS, PING_COUNTS
from .bench.report import write_report
from .bench.scale import SCALE_NETWORK, SCALE_RECONCILE, run_scale
from .bench.stats import PING_INTERVALS, Sample
from .demo import signals_interrupt


@dataclass
class Settings:
    """What one run measures, from the command line."""

    backends: list[str]
    rounds: int
    seconds: float
    rtts: int
    pings: list[int]
    idle: float
    ipv6: bool
    scale: list[int]
    scale_only: bool
    scale_timeout: float
    out: Path
    prefix: str

    def document(self) -> dict:
        """The settings as benchmark.json records them."""
        return {
            "backends": self.backends,
            "rounds": self.rounds,
            "iperf3_seconds": self.seconds,
            "round_trips": self.rtts,
            "round_trip_warmup": RR_WARMUP,
            "message_bytes": 64,
            "ping_intervals": list(PING_INTERVALS),
            "ping_counts": self.pings,
            "idle_seconds": self.idle,
            "network": NETWORK,
            "ipv6": self.ipv6,  # the IPv6 rows: 1 stream and the round trips, separate labs
            "ipv6_network": NETWORK6 if self.ipv6 else None,
            "scale_peers": self.scale,
            "scale_network": SCALE_NETWORK,
            "scale_reconcile_interval": SCALE_RECONCILE,
            "scale_timeout": self.scale_timeout,
        }


def run(s: Settings) -> int:
    """The data-path rounds (their labs torn down before the scale runs), the scale runs, the
    report; the exit status."""
    journal = Journal()
    prefixes = (f"{s.prefix}{n:02d}" for n in itertools.count(1))  # a fresh prefix per lab
    samples: list[Sample] = []
    datapaths: list[str] = []
    if not s.scale_only:
        with ExitStack() as stack:
            samples, datapaths = run_rounds(
                journal,
                stack,
                prefixes,
                s.backends,
                s.rounds,
                s.seconds,
                s.rtts,
                s.ipv6,
                s.pings,
                s.idle,
            )
            journal("tearing the data-path labs down")
    # (the control plane is the same for a variant as for its backend)
    plain = [b for b in s.backends if b not in VARIANTS]
    scale = run_scale(journal, prefixes, plain, s.scale, s.scale_timeout)
    wall = journal.progress.elapsed()
    return write_report(s.out, s.document(), wall, samples, datapaths, scale, journal.errors)


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


def _ping_counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != len(PING_INTERVALS) or any(v < 0 or v > 100000 for v in values):
        intervals = ", ".join(f"{iv:g}" for iv in PING_INTERVALS)
        raise argparse.ArgumentTypeError(
            f"{text!r}: give {len(PING_INTERVALS)} counts (0 to 100000, 0 skips), one per "
            f"send interval {intervals} s"
        )
    return values


def parse_args(argv: list[str] | None) -> Settings:
    known = [*backends.known_backends(), *VARIANTS]
    parser = argparse.ArgumentParser(
        prog="deploy/benchmark.sh",
        description="Measure every backend against the bare underlay in the namespace lab "
        "(host-gw and vxlan over IPv6 too, against the IPv6 underlay): throughput, latency, "
        "agent CPU and memory, join time; and control-plane scale. Run as root.",
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
        "--pings",
        type=_ping_counts,
        default=list(PING_COUNTS),
        metavar="N,N,N",
        help="pings per round at send intervals of "
        + ", ".join(f"{iv:g}" for iv in PING_INTERVALS)
        + " s (default "
        + ",".join(map(str, PING_COUNTS))
        + ": 16 s per datapath and round; 0,0,0 skips them)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=IDLE_SECONDS,
        help=f"seconds over which idle agents' CPU is measured each round (default "
        f"{IDLE_SECONDS:g}; 0 skips it)",
    )
    parser.add_argument(
        "--no-ipv6",
        action="store_true",
        help=f"skip the IPv6 rows ({', '.join(DUAL_STACK_BACKENDS)} and the underlay over IPv6, "
        "in dual-stack labs of their own)",
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
    if a.rounds < 1 or a.seconds <= 0 or a.rtts < 10 or a.idle < 0:
        parser.error(
            "--rounds must be at least 1, --seconds positive, --rtts at least 10, --idle 0 or more"
        )
    if a.scale_only and not a.scale:
        parser.error("--scale-only needs --scale N,...")
    if a.prefix and not re.fullmatch(r"[a-z][a-z0-9]{1,8}", a.prefix):
        parser.error("--prefix must be a lower-case letter and 1 to 8 letters or digits")
    return Settings(
        backends=chosen,
        rounds=a.rounds,
        seconds=a.seconds,
        rtts=a.rtts,
        pings=a.pings,
        idle=a.idle,
        ipv6=not a.no_ipv6,
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
    if shutil.which("ping") is None:
        missing.append("ping (apt-get install iputils-ping)")
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
            return run(settings)
    except KeyboardInterrupt:
        print("\ninterrupted; the labs are torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
