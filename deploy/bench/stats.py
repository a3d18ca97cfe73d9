"""The benchmark's statistics: percentiles, medians, ratios to the underlay, and the summary
of the data-path samples. Pure: no lab, no I/O.

A datapath measured over IPv6 (in a dual-stack lab) is named with IPV6_SUFFIX, e.g.
"vxlan (IPv6)"; its ratios are to the IPv6 underlay's medians ("underlay (IPv6)")."""

from __future__ import annotations

import statistics
from typing import Any

UNDERLAY = "underlay"  # the datapath name of the bare node-to-node runs, the reference
IPV6_SUFFIX = " (IPv6)"
UNDERLAY6 = UNDERLAY + IPV6_SUFFIX  # the same over the IPv6 underlay, the IPv6 rows' reference

Sample = dict[str, Any]

# the send intervals (s) of the ping runs (deploy/bench/pings.py) and their percentiles
PING_INTERVALS: tuple[float, ...] = (0.2, 0.02, 0.002)
PING_QUANTILES = (50, 99)


def ping_key(interval: float, q: int) -> str:
    """The sample key of the `q`-th percentile RTT (µs) of the pings sent every `interval` s."""
    return f"ping_{interval:g}_p{q}_us"


PING_METRICS = tuple(ping_key(iv, q) for iv in PING_INTERVALS for q in PING_QUANTILES)
PING_P50 = tuple(ping_key(iv, 50) for iv in PING_INTERVALS)

METRICS = (
    "gbps_1",
    "gbps_4",
    "p50_us",
    "p99_us",
    "cpu_src_pct_1",
    "cpu_dst_pct_1",
    "rss_mb",
    "join_ms",
    "idle_cpu_pct",
    *PING_METRICS,
)


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: list[float | None]) -> float | None:
    """The median of the values present (a failed measurement is None); None if none is."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ratio(value: float | None, base: float | None) -> float | None:
    """`value / base`, or None when either is missing (or the base is 0)."""
    return value / base if value is not None and base else None


def ipv6_name(datapath: str) -> str:
    """The name of `datapath` measured over IPv6."""
    return datapath + IPV6_SUFFIX


def is_ipv6(datapath: str) -> bool:
    return datapath.endswith(IPV6_SUFFIX)


def is_underlay(datapath: str) -> bool:
    return datapath in (UNDERLAY, UNDERLAY6)


def underlay_of(datapath: str) -> str:
    """The underlay `datapath` is compared with: the one of its address family."""
    return UNDERLAY6 if is_ipv6(datapath) else UNDERLAY


def summarise(samples: list[Sample], datapaths: list[str]) -> dict[str, dict[str, float | None]]:
    """Per datapath: the median of each metric over the rounds, and the ratios of throughput
    and p50 latencies (request/response, and pings at each interval) to the medians of the
    underlay of its address family."""
    out: dict[str, dict[str, float | None]] = {}
    for dp in datapaths:
        runs = [s for s in samples if s["datapath"] == dp]
        out[dp] = {m: median([s.get(m) for s in runs]) for m in METRICS}
        out[dp]["rounds"] = len(runs)
    for dp, row in out.items():
        base = out.get(underlay_of(dp), {})
        for m in ("gbps_1", "gbps_4", "p50_us", *PING_P50):
            row[f"{m}_ratio"] = ratio(row[m], base.get(m))
    return out
