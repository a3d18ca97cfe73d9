"""Chaos in a 3-node lab with continuous pings between containers: etcd stopped for 60 s,
an agent killed with SIGKILL and restarted, a node's lease deleted by hand. No ping may be lost
for the outage and the restart, and every node converges afterwards."""

from __future__ import annotations

import json
import signal
import time

import pytest

from deploy.bench.measure import cpu_seconds
from deploy.lab import Lab

from .cluster import PREFIX, Cluster, need_lab, sample, wait_until

OUTAGE = 60
PORT = 8471


def streams(lab: Lab, seconds: float) -> list:
    n1, n2, n3 = lab.nodes
    pairs = [(n1, n2), (n2, n3), (n3, n1)]
    return [
        lab.ping_stream(a.containers[0].ns, b.containers[0].ip, seconds, 0.05) for a, b in pairs
    ]


def lost(lab: Lab, procs: list) -> list[tuple[int, int]]:
    results = [lab.stream_result(p, timeout=OUTAGE + 60) for p in procs]
    return [(sent, sent - answered) for sent, answered in results if sent != answered]


def watch(c: Cluster, node) -> tuple[float, float]:
    """The agent's (flannel_watch_resyncs_total, flannel_watch_reconnects_total)."""
    text = c.metrics(node, PORT)
    resyncs = sample(text, "flannel_watch_resyncs_total")
    return resyncs, sample(text, "flannel_watch_reconnects_total")


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_chaos(backend):
    need_lab()
    with Lab(nodes=3, containers=1) as lab:
        lab.start_etcd()
        c = Cluster(
            lab,
            {"Network": "10.244.0.0/16", "Backend": {"Type": backend}},
            ("--reconcile-interval=2", "--healthz-ip=127.0.0.1", f"--healthz-port={PORT}"),
        )
        c.start_all()
        c.assert_all_reachable()
        n1, n2, n3 = lab.nodes

        # 1. etcd stopped for 60 s: the datapath keeps working, no CPU spin, one log line each.
        pings = streams(lab, OUTAGE + 8)
        time.sleep(1)
        resyncs = {n.name: watch(c, n)[0] for n in lab.nodes}
        cpu0 = {n.name: cpu_seconds(c.procs[n.name].pid) for n in lab.nodes}
        lab.stop_etcd()
        time.sleep(OUTAGE)
        cpu = {n.name: cpu_seconds(c.procs[n.name].pid) - cpu0[n.name] for n in lab.nodes}
        lab.start_etcd()
        back = time.monotonic()
        assert lost(lab, pings) == [], "pings lost during the etcd outage"
        assert max(cpu.values()) < 0.05 * OUTAGE, f"agent CPU during the outage: {cpu}"
        # within 5 s of etcd's return the watch is live again: a new peer lease shows up
        fake = {"PublicIP": "192.0.2.99", "PublicIPv6": None, "BackendType": backend}
        if backend == "vxlan":
            fake["BackendData"] = {"VNI": 1, "VtepMAC": "0a:00:00:00:00:99"}
        lab.etcdctl("put", f"{PREFIX}/subnets/10.244.250.0-24", json.dumps(fake))
        wait_until(
            lambda: "10.244.250.0/24" in {r["dst"] for r in c.routes(n1)},
            5,
            what="a lease written after the outage to be programmed",
        )
        assert time.monotonic() - back < 8
        lab.etcdctl("del", f"{PREFIX}/subnets/10.244.250.0-24")
        for node in lab.nodes:
            # every agent saw the watch break and listed the leases again exactly once, when
            # etcd came back (not once per retry), and reaches etcd again; an agent between
            # two retries (back-off up to 4.8 s) lists them at its next one
            wait_until(
                lambda node=node: watch(c, node)[0] > resyncs[node.name],
                10,
                what=f"{node.name} to list the leases again",
            )
            again, reconnects = watch(c, node)
            assert again == resyncs[node.name] + 1 and reconnects >= 1, (again, reconnects)
            assert c.status(node)["etcd"]["reachable"]
            # The log lines are the behaviour here: one line when the outage starts and one
            # when it ends, not one per retry in between. So they are counted.
            log = c.log(node)
            assert log.count("etcd watch failed") == 1, log[-3000:]
            assert log.count("etcd watch recovered") == 1, log[-3000:]

        # 2. an agent killed with SIGKILL and restarted: no ping lost, same subnet.
        before = c.env(n2)["FLANNEL_SUBNET"]
        pings = streams(lab, 6)
        time.sleep(1)
        c.stop(n2, sig=signal.SIGKILL)
        c.start(n2)
        # subnet.env is still the killed agent's: the new one's own status tells its lease
        status = c.wait_serving(n2)
        assert status["lease"]["subnet"] == c.subnet(n2) == before.replace(".1/", ".0/")
        assert lost(lab, pings) == [], "pings lost across the SIGKILL restart"

        # 3. a node's lease deleted by hand: the agent takes it again, everyone converges.
        lab.etcdctl("del", f"{PREFIX}/subnets/{before.replace('.1/', '.0-')}")
        wait_until(
            lambda: lab.etcdctl(
                "get", "--print-value-only", f"{PREFIX}/subnets/{before.replace('.1/', '.0-')}"
            ),
            10,
            what="the deleted lease to be taken again",
        )
        c.assert_all_reachable(timeout=15)
        assert c.env(n2)["FLANNEL_SUBNET"] == before
