"""`flannelctl cleanup` on a lab node: the agent's routes, devices and iptables rules go,
nothing else does."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from deploy.lab import Lab

from .cluster import Cluster, need_lab, ours, wait_until

ADMIN_RULE = ("-s", "10.99.0.0/24", "-m", "comment", "--comment", "admin", "-j", "MASQUERADE")


def table(lab: Lab, ns: str) -> list[dict]:
    return json.loads(lab.run(ns, "ip", "-j", "route", "show", "table", "main").stdout)


def rules(lab: Lab, ns: str) -> list[str]:
    """The node's iptables rules (`-A` lines of every table; no counters, no timestamps)."""
    return [x for x in lab.run(ns, "iptables-save").stdout.splitlines() if x.startswith("-A ")]


def links(lab: Lab, ns: str) -> set[str]:
    return {x["ifname"] for x in json.loads(lab.run(ns, "ip", "-j", "link", "show").stdout)}


def test_cleanup_removes_only_what_the_agent_owns():
    need_lab()
    if shutil.which("iptables") is None:  # deploy/run-tests.sh installs it
        pytest.skip("iptables is not installed: the agent's masquerade rules cannot be checked")
    with Lab(nodes=2, containers=1) as lab:
        lab.start_etcd()
        c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
        c.start_all("--ip-masq")
        n1, n2 = lab.nodes
        peer = c.subnet(n2)
        wait_until(
            lambda: any(r.get("dst") == peer and ours(r) for r in table(lab, n1.ns)),
            10,
            what="the peer route on n1",
        )
        agent_rules = rules(lab, n1.ns)
        # the agent's masquerade and forward chains, as the reference names them
        jump = '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG'
        assert jump in agent_rules
        assert any(x.startswith("-A FLANNEL-FWD -s 10.244.0.0/16") for x in agent_rules)
        c.stop(n1)
        # Things that are not the agent's: a static route, a vxlan device of another name, an
        # administrator's NAT rule.
        lab.run(n1.ns, "ip", "route", "add", "10.99.0.0/24", "via", n2.ip)
        lab.run(
            n1.ns,
            "ip",
            "link",
            "add",
            "name",
            "vx9",
            "type",
            "vxlan",
            "id",
            "9",
            "dstport",
            "4789",
            "dev",
            "eth0",
        )
        lab.run(n1.ns, "iptables", "-t", "nat", "-A", "POSTROUTING", *ADMIN_RULE)
        before = table(lab, n1.ns)
        agents = [r for r in before if ours(r)]
        assert peer in {r["dst"] for r in agents}, before
        theirs = [r for r in before if not ours(r) and r.get("dev") != "flannel.1"]
        assert "10.99.0.0/24" in {r["dst"] for r in theirs}

        out = lab.run(n1.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup").stdout
        assert "device flannel.1 (vxlan)" in out  # it says what it removed
        after = table(lab, n1.ns)
        assert after == theirs  # the agent's routes (and the device's) gone, no other one
        assert not [r for r in after if ours(r)]
        assert "flannel.1" not in links(lab, n1.ns) and "vx9" in links(lab, n1.ns)

        left = rules(lab, n1.ns)
        assert left == ["-A POSTROUTING -s 10.99.0.0/24 -m comment --comment admin -j MASQUERADE"]
        again = lab.run(n1.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup")
        assert again.returncode == 0 and "removed" not in again.stdout  # nothing left to remove
        assert table(lab, n1.ns) == after and rules(lab, n1.ns) == left
