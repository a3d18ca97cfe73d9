"""The demo's summary table and its option checks: pure, or refused before any lab is built,
so no root is needed (moved from tests/e2e/test_demo.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deploy.demo import render_summary
from deploy.lab import Container, Node

ROOT = Path(__file__).resolve().parents[2]


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.demo", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_options_fail_before_building():
    res = demo("--nodes", "0")
    assert res.returncode == 2 and "--nodes must be between 1 and 20" in res.stderr
    res = demo("--down")
    assert res.returncode == 2 and "--down needs the --prefix" in res.stderr
    res = demo("--down", "--prefix", "Bad_Prefix")
    assert res.returncode == 2 and "must match" in res.stderr


def test_summary_marks_failures_and_plain_terminals():
    nodes = [Node("n1", "p-n1", "192.0.2.11"), Node("n2", "p-n2", "192.0.2.12")]
    nodes[0].containers.append(Container("p-n1c1", "10.244.1.2"))
    nodes[1].containers.append(Container("p-n2c1", "10.244.2.2"))
    envs = {
        "n1": {"FLANNEL_SUBNET": "10.244.1.1/24", "FLANNEL_MTU": "1450"},
        "n2": {"FLANNEL_SUBNET": "10.244.2.1/24", "FLANNEL_MTU": "1450"},
    }
    matrix = {("p-n1c1", "10.244.2.2"): True, ("p-n2c1", "10.244.1.2"): False}
    text = render_summary(nodes, envs, "vxlan", matrix, 4.25)
    assert "    n1c1   ·     ✓" in text and "    n2c1   ✗     ·" in text
    assert "1/2 pings answered: 1 FAILED (4.2 s)" in text
    assert "  n2    p-n2       eth0 192.0.2.12  10.244.2.1/24  1450  10.244.2.2" in text
    plain = render_summary(nodes, envs, "vxlan", matrix, 4.25, encoding="ascii", color=True)
    plain.encode("ascii")
    assert "\033[31mx\033[0m" in plain
    lines = plain.splitlines()
    header = next(x for x in lines if x.strip().startswith("n1c1"))
    row = next(x for x in lines if x.startswith("    n2c1"))
    assert row.index("\033[31mx") == header.index("n1c1") + 1  # colour codes take no width
