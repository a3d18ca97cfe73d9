"""The benchmark as a user runs it (`python -m deploy.benchmark`, what deploy/benchmark.sh ends
in), in a tiny mode: one round of 1-second runs on host-gw against the underlay (a few pings at
each send interval, a 1-second idle window), the same over IPv6 against the IPv6 underlay (a
dual-stack lab), and the control-plane scale with 50 synthetic peers. It must write a sane
table, JSON and chart and leave no namespace behind."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.lab import cleanup, namespaces

from .cluster import need_lab

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def prefix():
    need_lab()
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed (deploy/run-tests.sh installs Debian's iperf3)")
    pytest.importorskip(
        "matplotlib", reason="the bench extra is not installed: pip install .[bench]"
    )
    p = f"bt{secrets.token_hex(3)}"
    yield p
    for lab in range(1, 4):  # after a killed run only: the labs are p01 (IPv4), p02 (dual
        # stack) and p03 (scale)
        cleanup(f"{p}{lab:02d}")


def test_tiny_run_writes_table_json_and_chart(prefix, tmp_path):
    args = ["--rounds", "1", "--seconds", "1", "--rtts", "200", "--backends", "host-gw"]
    args += ["--pings", "5,5,20", "--idle", "1"]
    res = subprocess.run(
        [sys.executable, "-m", "deploy.benchmark", *args, "--scale", "50"]
        + ["--out", str(tmp_path), "--prefix", prefix],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "[round 1/1] host-gw: iperf3 1 stream..." in out  # progress lines
    assert "[round 1/1] host-gw: node 3 joins..." in out
    assert "[round 1/1] host-gw: ping every 0.002 s x20..." in out
    assert "host-gw (IPv6): ping every" not in out  # pings over IPv4 only
    assert "[round 1/1] host-gw (IPv6): iperf3 1 stream..." in out
    assert "host-gw (IPv6): iperf3 4 streams" not in out and "(IPv6): node 3 joins" not in out
    assert "[scale] host-gw: 50 peers in the kernel after " in out
    rows = {
        cells[0]: cells
        for line in out.splitlines()
        if line.startswith("  ") and (cells := re.split(r"\s{2,}", line.strip()))
    }
    assert {"underlay*", "host-gw", "datapath", "backend"} <= set(rows)
    assert {"underlay (IPv6)*", "host-gw (IPv6)"} <= set(rows)
    assert rows["underlay (IPv6)*"][2:4] == ["-", "1.00/-"]  # 1 stream only

    doc = json.loads((tmp_path / "benchmark.json").read_text())
    assert doc["machine"]["nproc"] >= 1 and doc["machine"]["kernel"]
    assert doc["settings"]["rounds"] == 1 and doc["errors"] == []
    underlay, hostgw = doc["summary"]["underlay"], doc["summary"]["host-gw"]
    assert underlay["gbps_1"] > 0 and underlay["gbps_1_ratio"] == 1
    assert hostgw["gbps_1"] > 0 and hostgw["gbps_4"] > 0
    assert 0 < hostgw["gbps_1_ratio"] < 2 and 0 < hostgw["gbps_4_ratio"] < 2
    assert 0 < hostgw["p50_us"] <= hostgw["p99_us"] < 100_000
    assert 0 < hostgw["join_ms"] < 30_000 and 10 < hostgw["rss_mb"] < 500
    assert 0 <= hostgw["cpu_src_pct_1"] < 200
    for interval, count in (("0.2", 5), ("0.02", 5), ("0.002", 20)):
        for row in (underlay, hostgw):
            assert 0 < row[f"ping_{interval}_p50_us"] <= row[f"ping_{interval}_p99_us"] < 1e6
        assert 0 < hostgw[f"ping_{interval}_p50_us_ratio"] < 1000
        [sample] = [s for s in doc["samples"] if s["datapath"] == "host-gw"]
        assert 0 < len(sample["ping_us"][interval]) <= count
    assert 0 <= hostgw["idle_cpu_pct"] < 100 and underlay["idle_cpu_pct"] is None
    assert "ping 0.2 s p50/p99 µs" in out and "idle agent CPU %" in out
    assert [(s["datapath"], s["family"], len(s["rtt_ns"])) for s in doc["samples"]] == [
        ("underlay", 4, 200),
        ("host-gw", 4, 200),
        ("underlay (IPv6)", 6, 200),
        ("host-gw (IPv6)", 6, 200),
    ]

    # the IPv6 rows: single-stream TCP and the round trips, against the IPv6 underlay
    assert doc["settings"]["ipv6"] and doc["settings"]["ipv6_network"] == "fd00:10:244::/56"
    underlay6, hostgw6 = doc["summary"]["underlay (IPv6)"], doc["summary"]["host-gw (IPv6)"]
    assert underlay6["gbps_1"] > 0 and underlay6["gbps_1_ratio"] == 1
    assert 0 < underlay6["p50_us"] <= underlay6["p99_us"] < 100_000
    assert hostgw6["gbps_1"] > 0 and 0 < hostgw6["gbps_1_ratio"] < 2
    assert hostgw6["gbps_1_ratio"] == hostgw6["gbps_1"] / underlay6["gbps_1"]
    assert 0 < hostgw6["p50_us"] <= hostgw6["p99_us"] < 100_000
    assert 0 < hostgw6["p50_us_ratio"] < 20
    assert hostgw6["gbps_4"] is None and hostgw6["join_ms"] is None
    assert 10 < hostgw6["rss_mb"] < 500 and 0 <= hostgw6["cpu_src_pct_1"] < 200

    [scale] = doc["scale"]
    assert scale["converged"] and scale["counts"] == scale["expected"] == {"route": 50}
    assert 0 < scale["kernel_s"] < 60 and scale["removed_s"] is not None
    assert scale["kernel_after_write_s"] <= scale["kernel_s"]
    assert 0 < scale["cold_ready_s"] <= scale["cold_kernel_s"] < 60  # ready after its first pass
    assert scale["noop_ms"] is not None and 0 < scale["one_more_ms"] < 30_000
    assert scale["full_ms"] is not None and scale["full_ms"] > 0
    assert scale["rss_after_mb"] > 10

    png = (tmp_path / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert namespaces(prefix) == []
