"""The agent's start-up paths in a one-node lab: waiting for a valid config, refusing NAT on
host-gw, a bad flag, and the lease record it writes."""

from __future__ import annotations

import json
import sys
import time

import pytest

from deploy.lab import Lab

from .cluster import PREFIX, Cluster, need_lab, ours, wait_until


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
    # The log line is the behaviour here: a bad config is reported once, naming the key and
    # the limit, not once per poll. So the test waits for it, then counts.
    wait_until(lambda: "SubnetLen" in c.log(node), 10, what="config error in the log")
    time.sleep(2.5)  # two more polls of the bad config
    errors = [line for line in c.log(node).splitlines() if "SubnetLen" in line]
    assert len(errors) == 1, errors  # one line, not one per poll
    assert "less than /31" in errors[0]
    # ...and the agent is waiting, not running with it: alive, not ready, no lease anywhere
    assert c.http_get(node, "/readyz", 8471)[0] == 503 and c.procs[node.name].poll() is None
    waiting = c.status(node)
    assert (waiting["ready"], waiting["network"], waiting["lease"]) == (False, None, None)
    assert lab.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip() == ""
    assert not c.subnet_file(node).exists()
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
    status = c.status(node)
    assert status["ready"] and status["network"] == "10.244.0.0/16"
    assert status["lease"]["subnet"] == c.subnet(node)


def test_host_gw_refuses_nat(lab):
    node = lab.nodes[0]
    c = Cluster(lab, {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}})
    proc = c.start(node, "--public-ip=203.0.113.7")
    assert proc.wait(15) == 1
    # refused before anything is touched: no lease, no subnet.env, no route
    assert lab.etcdctl("get", "--prefix", "--keys-only", f"{PREFIX}/subnets/").strip() == ""
    assert not c.subnet_file(node).exists()
    assert not [r for r in c.routes(node) if ours(r)]
    # The message is the behaviour here (the operator learns which flag is wrong, in one
    # error, without a traceback): its text is checked, once.
    log = c.log(node)
    assert log.count("--public-ip must be an address of --iface") == 1, log
    assert "Traceback" not in log


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
    # the one line on stderr is the behaviour: it names the flag's range
    assert res.stderr.strip().count("\n") == 0 and "1 and 1439" in res.stderr
