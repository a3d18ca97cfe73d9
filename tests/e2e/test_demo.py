"""The demo lab as a user runs it (`python -m deploy.demo`, what deploy/demo.sh ends in): the
summary (also dual-stack, --ipv6), the exit status, --keep and --down, and that no namespace
of the run is left."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy import lab

from .cluster import need_lab, wait_until

ROOT = Path(__file__).resolve().parents[2]


def namespaces(prefix: str) -> list[str]:
    return lab.namespaces(f"{prefix}-")


def demo(
    *args: str, timeout: float = 90, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def prefix():
    need_lab()
    p = f"dm{secrets.token_hex(3)}"
    yield p
    demo("--down", "--prefix", p, timeout=30)  # after a failed test only


def test_two_nodes_all_green_and_nothing_left(prefix):
    res = demo("--backend", "host-gw", "--nodes", "2", "--prefix", prefix)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert f"lab {prefix}: 2 node namespaces" in out  # progress lines
    assert "n2 ready: subnet 10.244." in out
    assert "flanneld-py demo lab: 2 nodes, backend host-gw, network 10.244.0.0/16" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  n1 ", "  n2 "))]
    assert [r[:4] for r in rows] == [
        ["n1", f"{prefix}-n1", "eth0", "192.0.2.11"],
        ["n2", f"{prefix}-n2", "eth0", "192.0.2.12"],
    ]
    assert all(r[4].startswith("10.244.") and r[5] == "1500" for r in rows)
    assert "    n1c1   ·     ✓" in out and "    n2c1   ✓     ·" in out
    assert "2/2 pings answered: all green" in out
    assert namespaces(prefix) == []


def test_keep_then_down_from_another_terminal(prefix):
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.demo", "--backend", "host-gw", "--nodes", "1"]
        + ["--keep", "--prefix", prefix],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("tear it down" in x for x in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        out = "".join(lines)
        assert f"enter a node:       ip netns exec {prefix}-n1 bash" in out, out
        assert f"deploy/demo.sh --down --prefix {prefix}" in out
        assert "nothing to ping: one node" in out
        assert f"{prefix}-n1" in namespaces(prefix) and proc.poll() is None

        down = demo("--down", "--prefix", prefix, timeout=30)
        assert down.returncode == 0, down.stdout + down.stderr
        assert f"stopped the demo (pid {proc.pid})" in down.stdout
        assert proc.wait(10) == 0
        assert namespaces(prefix) == []
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            proc.wait(10)
        proc.stdout.close()


def test_an_agent_that_exits_fails_the_demo_with_its_log(prefix):
    # the agents inherit the environment: a public IP not on the node makes host-gw refuse
    res = demo(
        "--backend",
        "host-gw",
        "--nodes",
        "2",
        "--prefix",
        prefix,
        env={"FLANNELD_PUBLIC_IP": "203.0.113.7"},
    )
    assert res.returncode == 1
    assert "error: agent on n1 exited" in res.stderr
    assert "--- flanneld on n2, last lines:" in res.stderr
    assert "--public-ip must be an address of --iface" in res.stderr
    assert namespaces(prefix) == []


def test_ctrl_c_while_building_tears_down(prefix):
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.demo", "--backend", "host-gw", "--nodes", "2"]
        + ["--prefix", prefix],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: f"{prefix}-n2" in namespaces(prefix), 20, what="the lab's namespaces")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and "interrupted; the lab is torn down" in err
    assert namespaces(prefix) == []


def test_ipv6_refuses_udp_in_one_line_before_building():
    res = demo("--ipv6", "--backend", "udp", "--nodes", "2", timeout=30)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "deploy/demo.sh: --ipv6 needs host-gw, vxlan or wireguard: the udp backend carries "
        "IPv4 only"
    ]
    assert res.stdout == ""


def test_ipv6_two_nodes_both_grids_all_green_and_nothing_left(prefix):
    res = demo("--ipv6", "--backend", "host-gw", "--nodes", "2", "--prefix", prefix)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "network 10.244.0.0/16 and fd00:10:244::/56" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  n1 ", "  n2 "))]
    assert [r[:5] for r in rows] == [
        ["n1", f"{prefix}-n1", "eth0", "192.0.2.11", "fd00:192::11"],
        ["n2", f"{prefix}-n2", "eth0", "192.0.2.12", "fd00:192::12"],
    ]
    assert all(r[5].startswith("10.244.") and r[6].startswith("fd00:10:244:") for r in rows)
    assert all(r[8].startswith("10.244.") and r[9].startswith("fd00:10:244:") for r in rows)
    assert "IPv4 ping matrix" in out and "IPv6 ping matrix" in out
    assert out.index("IPv4 ping matrix") < out.index("IPv6 ping matrix")
    assert out.count("    n1c1   ·     ✓") == 2 and out.count("    n2c1   ✓     ·") == 2
    assert "4/4 pings answered (IPv4 2/2, IPv6 2/2): all green" in out
    assert namespaces(prefix) == []
