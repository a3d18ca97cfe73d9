"""The agent's start-up paths in a one-node lab: waiting for a valid config, refusing NAT on
host-gw, a bad flag, and the lease record it writes."""

from __future__ import annotations

import json
import sys
import time

import pytest

from deploy.lab import Lab

from .cluster import PREFIX, Cluster, need_lab, wait_until


@pytest.fixture
def lab():
    need_lab()
    with Lab(nodes=1, containers=0) as lab:
        lab.start_etcd()
        yield lab


def test_waits_for_a_valid_config_then_becomes_ready(lab):
    node = lab.nodes[0]
    c = Cluster(lab, {"Network": "10.244.0.0/16", "SubnetLen": 31, "Backend": {"Type": "host-gw"}})
    c.start(node, "--healthz-ip=127.0.0.1", "--healthz-port=8471")
    wait_until(lambda: "SubnetLen" in c.log(node), 10, what="config error in the log")
    time.sleep(2.5)  # two more polls of the bad config
    errors = [line for line in c.log(node).splitlines() if "SubnetLen" in line]
    assert len(errors) == 1, errors  # one line, not one per poll
    assert "less than /31" in errors[0]
    assert c.http_get(node, "/readyz", 8471)[0] == 503 and c.procs[node.name].poll() is None
    lab.etcdctl(
        "put",
        f"{PREFIX}/config",
        json.dumps({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}),
    )
    env = c.wait_ready(node, timeout=10)
    assert c.http_get(node, "/readyz", 8471)[0] == 200
    key = env["FLANNEL_SUBNET"].replace(".1/", ".0-").replace("/", "-")
    record = lab.etcdctl("get", "--print-value-only", f"{PREFIX}/subnets/{key}").strip()
    assert record == f'{{"PublicIP":"{node.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'


def test_host_gw_refuses_nat(lab):
    node = lab.nodes[0]
    c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}})
    proc = c.start(node, "--public-ip=203.0.113.7")
    assert proc.wait(15) == 1
    log = c.log(node)
    assert "--public-ip must be an address of --iface" in log and "Traceback" not in log
    assert lab.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip() == ""


def test_bad_flag_is_one_line(lab):
    res = lab.run(
        lab.nodes[0].ns,
        sys.executable,
        "-m",
        "flanneld",
        "--subnet-lease-renew-margin=0",
        check=False,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "1 and 1439" in res.stderr
