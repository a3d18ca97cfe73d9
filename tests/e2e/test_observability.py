"""Operator tools in a 3-node lab: `flannelctl status` (drift visible until repaired), the
Prometheus metrics, JSON logs, the etcd tools (leases, config, reservations), and what the
health port serves and withstands."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from .cluster import Cluster, running, sample, wait_until

INTERVAL = 6


@pytest.fixture(scope="module")
def cluster():
    args = (
        f"--reconcile-interval={INTERVAL}",
        "--healthz-ip=127.0.0.1",
        "--healthz-port=8471",
        "--log-format=json",
    )
    with running({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}, args) as c:
        c.assert_all_reachable()
        yield c


def ctl(c: Cluster, node, *args: str, check: bool = True):
    state = c.lab.workdir / node.name
    extra = (
        ("--state-dir", str(state))
        if args[0] == "status"
        else (() if args[0] == "cleanup" else ("--etcd-endpoints", c.lab.etcd_endpoint))
    )
    return c.lab.run(node.ns, sys.executable, "-m", "flanneld.face.ctl", *args, *extra, check=check)


def metrics(c: Cluster, node) -> str:
    return c.metrics(node, 8471)


def test_status_lists_peers_and_shows_drift_until_repaired(cluster):
    n1, n2, n3 = cluster.lab.nodes
    doc = json.loads(ctl(cluster, n1, "status", "--json").stdout)
    assert doc["ready"] and doc["backend"] == "host-gw" and doc["mtu"] == 1500
    assert doc["lease"]["subnet"] == cluster.env(n1)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    assert 0 < doc["lease"]["renew_in"] < doc["lease"]["expires_in"] <= 86400
    assert {p["public_ip"] for p in doc["peers"]} == {n2.ip, n3.ip}
    assert all(p["state"] == "ok" for p in doc["peers"]) and doc["etcd"]["reachable"]
    text = ctl(cluster, n1, "status").stdout
    assert "ready" in text and n2.ip in text and "ok" in text

    # Just after a full reconcile, delete one peer's route: drifted until the next one.
    runs = sample(metrics(cluster, n1), "flannel_reconcile_runs_total", mode="full")
    wait_until(
        lambda: sample(metrics(cluster, n1), "flannel_reconcile_runs_total", mode="full") > runs,
        INTERVAL + 2,
        what="a full reconcile",
    )
    repaired = sample(metrics(cluster, n1), "flannel_entries_total", op="repaired", kind="route")
    sub2 = cluster.env(n2)["FLANNEL_SUBNET"].replace(".1/", ".0/")
    cluster.lab.run(n1.ns, "ip", "route", "del", sub2)
    res = ctl(cluster, n1, "status", check=False)
    assert res.returncode == 0
    drifted = [line for line in res.stdout.splitlines() if line.startswith(sub2)]
    assert drifted and "DRIFTED: missing" in drifted[0] and n2.ip in drifted[0], res.stdout

    def repaired_now():
        doc = json.loads(ctl(cluster, n1, "status", "--json").stdout)
        return all(p["state"] == "ok" for p in doc["peers"])

    wait_until(repaired_now, INTERVAL + 3, step=0.5, what="the drift to be repaired")
    after = sample(metrics(cluster, n1), "flannel_entries_total", op="repaired", kind="route")
    assert after == repaired + 1


def test_metrics_are_documented_and_move(cluster):
    n1 = cluster.lab.nodes[0]
    text = metrics(cluster, n1)
    assert sample(text, "flannel_peers") == 2
    assert sample(text, "flannel_ready") == 1
    assert sample(text, "flannel_lease_expiry_timestamp_seconds") > time.time() + 3600
    assert sample(text, "flannel_watch_resyncs_total") >= 1
    assert sample(text, "flannel_entries_total", op="added", kind="route") >= 2
    names = set(re.findall(r"^# TYPE (\w+)", text, re.M))
    documented = (Path(__file__).parents[2] / "README.md").read_text()
    for name in names:
        assert name in documented, f"{name} is not documented in the README"


def test_logs_are_json_lines(cluster):
    """The log format is the behaviour here: every line the agent wrote is one JSON object
    with the same keys (the wording of the messages is not checked)."""
    n1 = cluster.lab.nodes[0]
    lines = cluster.log(n1).splitlines()
    assert len(lines) > 5
    docs = [json.loads(line) for line in lines]  # every line, not only those that look so
    assert all({"time", "level", "logger", "msg"} <= set(d) for d in docs)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["time"]) for d in docs)
    assert {d["level"] for d in docs} <= {"debug", "info", "warning", "error", "critical"}
    assert any(d["logger"].startswith("flanneld.") for d in docs)


def test_lease_and_config_tools(cluster, tmp_path):
    n1, n2, n3 = cluster.lab.nodes
    out = ctl(cluster, n1, "leases").stdout
    for node in (n1, n2, n3):
        assert node.ip in out
    bad = ctl(cluster, n1, "config", "validate", "-", check=False)
    assert bad.returncode != 0  # stdin is empty: not JSON
    res = cluster.lab.run(
        n1.ns,
        sys.executable,
        "-m",
        "flanneld.face.ctl",
        "config",
        "set",
        "-",
        "--etcd-endpoints",
        cluster.lab.etcd_endpoint,
        input='{"Network": "10.244.0.0/16", "SubnetLen": 31}',
        check=False,
    )
    assert res.returncode == 2
    assert "SubnetLen must be less than /31" in res.stderr and res.stderr.count("\n") == 1
    assert json.loads(ctl(cluster, n1, "config", "show").stdout)["Backend"]["Type"] == "host-gw"

    reserved = "10.244.200.0/24"
    try:
        ctl(cluster, n1, "reserve", reserved, "192.0.2.77", "--backend-type", "host-gw")
        kv = cluster.lease_kv(reserved)
        assert kv is not None and kv.get("lease", 0) == 0  # no TTL: a reservation
        taken = ctl(cluster, n1, "reserve", reserved, "192.0.2.78", check=False)
        # refused, and the reservation is untouched (the message names its holder)
        assert taken.returncode == 2 and "held by 192.0.2.77" in taken.stderr
        assert cluster.lease_kv(reserved) == kv
        assert "reservation" in ctl(cluster, n1, "leases").stdout
        ctl(cluster, n1, "unreserve", reserved)
        assert cluster.lease_kv(reserved) is None
    finally:
        cluster.lab.etcdctl("del", cluster.lease_key(reserved))  # as the module found it
    own = cluster.subnet(n2)
    held = cluster.lease_kv(own)
    live = ctl(cluster, n1, "unreserve", own, check=False)
    # refused without --force (the message says so): n2's lease is still there, unchanged
    assert live.returncode == 2 and "--force" in live.stderr
    assert held is not None and cluster.lease_kv(own) == held


IDLE_FLOOD = r"""
import contextlib, json, os, resource, socket, sys, time
agent, port, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < count + 256:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
fds = lambda: len(os.listdir(f"/proc/{agent}/fd"))
baseline, socks = fds(), []
try:
    for i in range(count):
        s = socket.socket()
        socks.append(s)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        if i % 2:
            with contextlib.suppress(OSError):
                s.send(b"GET /healthz HTTP/1.1\r\n")
        if i % 100 == 99:
            time.sleep(0.01)
    time.sleep(0.5)
    held = fds() - baseline
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while chunk := probe.recv(4096):
            answer += chunk
    elapsed = time.monotonic() - start
finally:
    for s in socks:
        s.close()
print(json.dumps({"held": held, "status": int(answer.split()[1]), "elapsed": elapsed}))
"""


def test_health_port_serves_no_status_and_withstands_idle_connections(cluster):
    """The TCP port serves /healthz, /readyz and /metrics, never /status (peers, etcd); 1,000
    idle connections to it leave /healthz answering at once and the agent holding at most 64
    of them, and `flannelctl status` (the unix socket) still answers."""
    n1 = cluster.lab.nodes[0]
    assert cluster.http_get(n1, "/status", 8471)[0] == 404
    assert cluster.http_get(n1, "/healthz", 8471)[0] == 200
    assert cluster.http_get(n1, "/readyz", 8471)[0] == 200
    assert cluster.http_get(n1, "/metrics", 8471)[0] == 200
    agent = cluster.procs[n1.name].pid
    out = cluster.lab.run(
        n1.ns, sys.executable, "-c", IDLE_FLOOD, str(agent), "8471", "1000", timeout=60
    ).stdout
    probe = json.loads(out)
    assert probe["status"] == 200 and probe["elapsed"] < 1.0, probe
    assert probe["held"] <= 64 + 8, probe
    assert json.loads(ctl(cluster, n1, "status", "--json").stdout)["ready"]
