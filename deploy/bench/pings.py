"""Ping round trips at fixed send intervals, and an idle agent's CPU: what a user sees at
ordinary load. The request/response test runs back to back, so a userspace datapath never
sleeps during it; a ping every 0.2 s finds it asleep every time (and its caches cold).

iputils `ping -i INTERVAL -c COUNT` runs in the source namespace; it takes the arrival time of
an answer from the kernel's receive timestamp, so its own wake-up is not counted. The parsing
and the summary are pure (unit-tested); `ping_rtts` runs it in a lab.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .measure import BenchError, cpu_seconds
from .stats import PING_QUANTILES, Sample, percentile, ping_key

if TYPE_CHECKING:
    from ..lab import Lab

# echoes per interval of PING_INTERVALS (0.2, 0.02, 0.002 s): 10 s, 4 s and 2 s of pings
PING_COUNTS: tuple[int, ...] = (50, 200, 1000)
IDLE_SECONDS = 10.0  # the window over which an idle agent's CPU is measured

_REPLY = re.compile(r"^\d+ bytes from .*\btime=([\d.]+) ms(?!.*DUP!)", re.M)


def parse_ping(text: str) -> list[float]:
    """The RTTs in µs of the echo replies iputils `ping -n` printed, in order; duplicates
    (`DUP!`) are not counted and lost echoes print no line."""
    return [float(ms) * 1000 for ms in _REPLY.findall(text)]


def ping_summary(rtts: dict[float, list[float]]) -> Sample:
    """p50 and p99 per send interval of the RTTs (µs) measured at it; none for an interval
    without a reply."""
    out: Sample = {}
    for interval, values in rtts.items():
        if values:
            for q in PING_QUANTILES:
                out[ping_key(interval, q)] = percentile(values, q)
    return out


def ping_rtts(lab: Lab, src: str, dst_ip: str, interval: float, count: int) -> list[float]:
    """`count` echoes from namespace `src` to `dst_ip`, one every `interval` s; the RTTs (µs)
    of those answered (each waited for at most 1 s)."""
    res = lab.run(
        src,
        "ping",
        "-n",
        "-i",
        f"{interval:g}",
        "-c",
        str(count),
        "-W",
        "1",
        dst_ip,
        check=False,
        timeout=count * interval + 15,
    )
    rtts = parse_ping(res.stdout)
    if not rtts:
        raise BenchError(f"ping -i {interval:g} got no answer: {res.stderr.strip()[-200:]}")
    return rtts


def idle_cpu_pct(pids: Sequence[int], seconds: float) -> list[float]:
    """Each process's CPU (% of one core, its threads and running children) over `seconds`
    s in which nothing is sent (the caller sleeps meanwhile)."""
    before = [cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return [100 * (cpu_seconds(p) - b) / elapsed for p, b in zip(pids, before, strict=True)]
