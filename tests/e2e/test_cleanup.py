"""`flannelctl cleanup` on a lab node: the agent's routes, devices and iptables rules go,
nothing else does."""

from __future__ import annotations

import json
import shutil
import sys

from deploy.lab import Lab

from .cluster import Cluster, need_lab, wait_until


def table(lab: Lab, ns: str) -> list[dict]:
    return json.loads(lab.run(ns, "ip", "-j", "route", "show", "table", "main").stdout)


def links(lab: Lab, ns: str) -> set[str]:
    return {x["ifname"] for x in json.loads(lab.run(ns, "ip", "-j", "link", "show").stdout)}


def test_cleanup_removes_only_what_the_agent_owns():
    need_lab()
    with Lab(nodes=2, containers=1) as lab:
        lab.start_etcd()
        c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
        c.start_all("--ip-masq")
        n1, n2 = lab.nodes
        wait_until(
            lambda: any(r.get("dev") == "flannel.1" for r in table(lab, n1.ns)),
            10,
            what="the peer route on n1",
        )
        rules = lab.run(n1.ns, "iptables-save").stdout if shutil.which("iptables") else ""
        if rules:  # the agent's masquerade and forward chains, as the reference names them
            assert '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG' in rules
            assert "-A FLANNEL-FWD -s 10.244.0.0/16" in rules
        c.stop(n1)
        # Things that are not the agent's: a static route, a vxlan device of another name.
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
        before = table(lab, n1.ns)
        ours = [r for r in before if r.get("protocol") == 155 or r.get("dev") == "flannel.1"]
        assert ours, before

        out = lab.run(n1.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup").stdout
        assert "device flannel.1 (vxlan)" in out
        after = table(lab, n1.ns)
        assert [r for r in before if r not in ours] == after
        assert "10.99.0.0/24" in {r["dst"] for r in after}
        assert "flannel.1" not in links(lab, n1.ns) and "vx9" in links(lab, n1.ns)

        if rules:
            assert "FLANNEL" not in lab.run(n1.ns, "iptables-save").stdout
        again = lab.run(n1.ns, sys.executable, "-m", "flanneld.face.ctl", "cleanup").stdout
        assert "no route or device of the agent's left" in again
        assert table(lab, n1.ns) == after
