"""The benchmark's report: the tables on the terminal, `benchmark.json` (date, machine,
settings, every raw sample) and the chart `benchmark.png` (matplotlib)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flanneld.core.text import table_lines

from ..lab import SEG1_NET6
from .datapath import NETWORK6
from .scale import NOOP_PASSES
from .stats import (
    PING_INTERVALS,
    UNDERLAY6,
    Sample,
    is_ipv6,
    is_underlay,
    ping_key,
    summarise,
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(summary: dict[str, dict[str, float | None]], rounds: int) -> str:
    """The data-path table: per datapath the medians over `rounds` rounds and the ratios to
    the underlay (of its address family), with notes on how to read them."""
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
                dp + ("*" if is_underlay(dp) else ""),
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
    if any(is_ipv6(dp) for dp in summary):
        notes.append(
            f"  (IPv6): the same over IPv6, in dual-stack labs of their own (underlay "
            f"{SEG1_NET6}, containers in {NETWORK6}); 1 stream only; × underlay = to "
            f"{UNDERLAY6}"
        )
    return "\n".join(table_lines(rows) + notes)


def render_ping_table(summary: dict[str, dict[str, float | None]], rounds: int) -> str:
    """The ping table: per datapath (those pinged) the p50/p99 RTT at each send interval with
    the p50's ratio to the underlay, and an idle agent's CPU; empty when nothing was pinged."""
    pinged = {
        dp: r for dp, r in summary.items() if any(r.get(ping_key(iv, 50)) for iv in PING_INTERVALS)
    }
    if not pinged:
        return ""
    header = ["datapath"]
    for iv in PING_INTERVALS:
        header += [f"ping {iv:g} s p50/p99 µs", "× underlay"]
    rows = [header + ["idle agent CPU %"]]
    for dp, r in pinged.items():
        row = [dp + ("*" if is_underlay(dp) else "")]
        for iv in PING_INTERVALS:
            p50, p99 = r.get(ping_key(iv, 50)), r.get(ping_key(iv, 99))
            row += [
                f"{_num(p50, '.0f')}/{_num(p99, '.0f')}",
                _num(r.get(f"{ping_key(iv, 50)}_ratio"), ".1f"),
            ]
        rows.append(row + [_num(r.get("idle_cpu_pct"), ".2f")])
    notes = [
        "",
        f"  medians over {rounds} round(s) of ping RTT p50/p99 (iputils ping, one echo every "
        "0.2 s, 0.02 s, 0.002 s; IPv4, container to container; * node to node); × underlay = "
        "p50 / the underlay's",
        "  idle agent CPU: % of one core per agent (its threads and children) over a window in "
        "which nothing was sent",
    ]
    return "\n".join(table_lines(rows) + notes)


def render_scale_table(results: list[Sample]) -> str:
    """The control-plane table: one row per scale run, with notes on what each column is."""
    rows = [
        [
            "backend",
            "peers",
            "write s",
            "all seen s",
            "in kernel s",
            "after last write s",
            "agent RSS MB",
            "full pass ms",
            "event pass ms",
            "+1 peer ms",
            "cold start: ready/all in kernel s",
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
                _num(r.get("kernel_after_write_s"), ".2f") if r["expected"] else "-",
                f"{_num(r['rss_before_mb'], '.0f')}→{_num(r['rss_after_mb'], '.0f')}",
                _num(r["full_ms"], ".0f"),
                _num(r["noop_ms"], ".0f"),
                _num(r["one_more_ms"], ".0f"),
                f"{_num(r.get('cold_ready_s'), '.2f')}/{_num(r.get('cold_kernel_s'), '.2f')}",
                _num(r["removed_s"], ".2f"),
            ]
        )
    notes = [
        "",
        "  s from the first lease write: all seen = every peer known to the agent "
        "(flannel_peers); in kernel = every route/FDB/ARP entry present (udp: nothing per peer "
        "in the kernel)",
        f"  with nothing to change (medians of {NOOP_PASSES}): full pass = wall time of a periodic "
        "reconcile (dumps the kernel), from the agent's metrics; event pass = agent CPU after a "
        "peer event (no dump)",
        "  after last write: every entry present, s after the last lease was committed",
        "  +1 peer: one more lease in etcd → its route in the kernel",
        "  cold start: agent restarted on a flushed node with the N + 1 leases in etcd → ready "
        "(subnet.env, written after its first pass) / every entry in the kernel",
        "  RSS: before the peers → with them; all removed: leases revoked → no peer known and "
        "every entry gone",
    ]
    return "\n".join(table_lines(rows) + notes)


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPUs, kernel, memory, Python and iperf3 versions."""
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


def chart(
    path: Path, samples: list[Sample], datapaths: list[str], scale: list[Sample], title: str
) -> None:
    """The PNG: data-path bars (median and range over the rounds) and scale curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pinged = [d for d in datapaths if any(s["datapath"] == d and "ping_us" in s for s in samples)]
    panels = (4 if samples else 0) + (1 if pinged else 0) + (4 if scale else 0)
    rows = (panels + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.set_visible(False)

    def bars(ax: Any, names: list[str], metrics: list[tuple[str, str]], unit: str) -> None:
        """Per name a group of bars, one per metric it has values of (centred on the name:
        the IPv6 rows have no 4-stream run)."""
        width = 0.8 / len(metrics)

        def values(name: str, metric: str) -> list[float]:
            return [
                s[metric] for s in samples if s["datapath"] == name and s.get(metric) is not None
            ]

        present = {n: [m for m, _ in metrics if values(n, m)] for n in names}
        for metric, label in metrics:
            xs, meds, lo, hi = [], [], [], []
            for i, name in enumerate(names):
                vs = values(name, metric)
                if vs:
                    m = statistics.median(vs)
                    k, count = present[name].index(metric), len(present[name])
                    xs.append(i + (k - (count - 1) / 2) * width)
                    meds.append(m)
                    lo.append(m - min(vs))
                    hi.append(max(vs) - m)
            ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=label)
        ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names])
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)

    def measured(metric: str) -> list[str]:
        """The backends' datapaths with a value of `metric` (the IPv6 ones have no join)."""
        return [
            d
            for d in datapaths
            if not is_underlay(d)
            and any(s["datapath"] == d and s.get(metric) is not None for s in samples)
        ]

    if samples:
        ax = axes.pop(0)
        bars(ax, datapaths, [("gbps_1", "1 stream"), ("gbps_4", "4 streams")], "Gbit/s")
        ax.set_title("TCP throughput (iperf3), median and range")
        ax = axes.pop(0)
        bars(ax, datapaths, [("p50_us", "p50"), ("p99_us", "p99")], "µs")
        ax.set_yscale("log")
        ax.set_title("request/response round trip, 64 bytes over TCP (log scale)")
        ax = axes.pop(0)
        cpu = [("cpu_src_pct_1", "sender"), ("cpu_dst_pct_1", "receiver")]
        bars(ax, measured("cpu_src_pct_1"), cpu, "%")
        ax.set_title("agent CPU during the 1-stream run (% of one core)")
        ax = axes.pop(0)
        bars(ax, measured("join_ms"), [("join_ms", "join→reachable")], "ms")
        ax.set_title("new node's lease in etcd → its container reachable")
    if pinged:
        ax = axes.pop(0)
        bars(ax, pinged, [(ping_key(iv, 50), f"every {iv:g} s") for iv in PING_INTERVALS], "µs")
        ax.set_yscale("log")
        ax.set_title("ping RTT p50 at three send intervals (log scale)")
    if scale:
        for ax, metric, unit, what in (
            (axes.pop(0), "kernel_s", "s", "N peers written → all entries in the kernel"),
            (axes.pop(0), "cold_kernel_s", "s", "cold start with N leases → all in the kernel"),
            (axes.pop(0), "rss_after_mb", "MB", "agent memory (VmRSS) with N peers"),
            (axes.pop(0), "full_ms", "ms", "one full reconcile with nothing to change"),
        ):
            for backend in dict.fromkeys(r["backend"] for r in scale):
                rs = [r for r in scale if r["backend"] == backend]
                key, label = metric, backend
                if metric == "kernel_s" and not rs[0]["expected"]:
                    key, label = "seen_s", f"{backend} (no kernel entries: all peers seen)"
                ys = [float("nan") if r.get(key) is None else r[key] for r in rs]
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


def write_report(
    out: Path,
    settings: dict[str, Any],
    wall: float,
    samples: list[Sample],
    datapaths: list[str],
    scale: list[Sample],
    errors: list[str],
) -> int:
    """Print the tables, write `out`/benchmark.json and (when anything was measured)
    `out`/benchmark.png, print the errors; the exit status: 1 when a measurement failed."""
    info = machine()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rounds = settings["rounds"]
    summary = summarise(samples, datapaths)
    print()
    if samples:
        print(render_table(summary, rounds))
        print()
        if pings := render_ping_table(summary, rounds):
            print(pings)
            print()
    if scale:
        print(render_scale_table(scale))
        print()
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": date,
        "machine": info,
        "settings": settings,
        "wall_seconds": round(wall, 1),
        "summary": summary,
        "samples": samples,
        "scale": scale,
        "errors": errors,
    }
    json_path, png_path = out / "benchmark.json", out / "benchmark.png"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    title = (
        f"flanneld-py backends, {date}: {info['nproc']} CPUs {info['cpu_model']}, "
        f"kernel {info['kernel']}" + (f"; medians of {rounds} rounds" if samples else "")
    )
    if samples or scale:
        chart(png_path, samples, datapaths, scale, title)
        print(f"wrote {json_path} and {png_path}; the run took {wall:.0f} s")
    else:
        print(f"nothing was measured; wrote {json_path}; the run took {wall:.0f} s")
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errors else 0
